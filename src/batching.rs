//! Group commit's one mechanism: callers queue work on a channel and wait for their answer; one
//! task takes whatever is queued as the next batch, commits it at once and answers each caller.
//! While a commit is in flight new work queues up and becomes the next batch, so the busier the
//! daemon, the larger the batches and the fewer the commits. Callback ingest (`ingest`) and the
//! outbox's record of created approvals (`outbox`) both batch this way; what a batch commits,
//! and what happens when a batch fails, is theirs.

use tokio::sync::mpsc;

/// Waits for the first queued item, then takes what else is queued, up to `max` in all. `None`
/// once the channel is closed and empty. Cancel-safe: nothing is taken unless it is returned.
pub async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_the_maximum_and_ends_when_closed() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(next_batch(&mut rx, 3).await, Some(vec![0, 1, 2]));
        assert_eq!(next_batch(&mut rx, 3).await, Some(vec![3, 4]));
        drop(tx);
        assert_eq!(next_batch(&mut rx, 3).await, None);
    }
}
