//! The lost-answer search (rule 2 of the outbox): finds the instances that creates without an
//! answer made, adopts each for its row, and sends again the rows whose create certainly made
//! none, spending as few DingTalk calls as it can (docs/dingtalk.md §7: every call is metered).
//!
//! One search resolves every `unknown` row of an originator and template at once:
//! - **Window.** A row's instance, if any, was created between its claim (`sent_at`) and half the
//!   lease later (rule 3: the send is cut off there) plus `lost_settle_ms` (DingTalk's gateway may
//!   still finish a create it got just before we gave up), widened by [`CLOCK_SKEW`] on each side.
//! - **One listing.** The windows of the rows whose create has certainly ended ("settled": due,
//!   or sent longer than half the lease plus the settle time ago) are merged where they overlap,
//!   and each merged span is listed once (`listids` of that originator and template).
//! - **No `get` for what is known.** Listed instances an outbox row owns are skipped; for the rest,
//!   a snapshot already in `dingsync.approvals` (from a detail fetch or an earlier search) is
//!   compared instead of asking DingTalk. An instance fetched here has its snapshot applied
//!   (`SnapshotSource::Search`), which answers the detail fetch its events asked for, so that
//!   `get` costs the month nothing extra when DingTalk's pushes arrived first, as they do.
//! - **Pairing.** Instances, oldest first, go to the oldest row whose request they match and whose
//!   window holds their create time: two rows with identical requests each get their own instance
//!   (the windows are ordered like the rows, so oldest-to-oldest never leaves a row without the
//!   instance another could have taken), and never the same one (`record_created` is conditional
//!   and `outbox.process_instance_id` is unique). Rows not yet settled may adopt what is found
//!   (that spares them a listing of their own) but are never declared absent.
//! - **Absent.** A settled row that got nothing is sent again, unless something could still turn
//!   up or have been taken from it: a `sending` row of the originator whose window overlaps (its
//!   create may be the instance, its answer on the way), or a matching instance that went to a
//!   row not yet settled. Those wait `lost_settle_ms` and are searched again.
//! - **One search per originator.** Within a worker, searches of one originator queue behind each
//!   other and a row the one before has dealt with is not searched again; across replicas the
//!   lease in `dingsync.outbox_search` lets one run at a time, the others wait `lost_settle_ms`
//!   (the running search adopts their rows if it finds their instances).
//!
//! Owns: the search. Does not own: the SQL (`store::outbox`, `store::approvals`), the comparison
//! of a request with an instance (`request`), the reading of a `get` answer
//! (`Snapshot::from_instance`, with `reconcile`'s detail fetch).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use super::{Worker, request};
use crate::{
    dingtalk::{ApiFamily, Purpose, types::CreateInstance},
    snapshot::Snapshot,
    store::{
        approvals::{self, SnapshotSource},
        outbox::{self as store, OutboxRow},
    },
};

/// `listids` selects by DingTalk's create time (docs/dingtalk.md §2.4); our times come from
/// PostgreSQL's clock. The window is widened by this much on each side for: create times kept in
/// whole seconds (§2.3), so up to 1 s earlier than the moment of creation; and the two clocks
/// disagreeing (NTP keeps servers within milliseconds; a few seconds allows for a host whose sync
/// has lapsed). A margin too small costs a duplicate approval, one too large only a few more ids
/// of one originator in a listing (20 a page), hence seconds rather than the bare minimum.
pub(super) const CLOCK_SKEW: TimeDelta = TimeDelta::seconds(5);

/// Which searches queue behind each other in one worker: organisation-wide per template and
/// originator (one worker serves one organisation).
pub(super) type SearchKey = (String, String);

/// An `unknown` row taking part in a search.
struct Party {
    row: OutboxRow,
    request: CreateInstance,
    window: (DateTime<Utc>, DateTime<Utc>),
    settled: bool,
    /// A matching instance in its window went to a row not yet settled: not certainly absent.
    doubtful: bool,
    /// A `sending` row's window overlaps: not certainly absent.
    blocked: bool,
    adopted: Option<String>,
}

/// An instance the listing found that no outbox row owns.
struct Found {
    id: String,
    created_at: Option<DateTime<Utc>>,
    /// Its place in the listing, which breaks ties between create times of the same second.
    order: usize,
    originator: Option<String>,
    form_values: Vec<Value>,
}

impl Worker {
    /// Resolves a claimed `unknown` row, together with every other `unknown` row of its
    /// originator and template: adopts the instances their creates made, sends again the rows
    /// DingTalk certainly holds none for. If DingTalk cannot be asked now, the rows stay `unknown`.
    pub(super) async fn search(&self, row: &OutboxRow) -> anyhow::Result<()> {
        if let Err(why) = request::create_request(row) {
            self.fail(row.id, "invalid", &format!("invalid request: {why}"))
                .await?;
            return Ok(());
        }
        let key: SearchKey = (row.process_code.clone(), row.originator_user_id.clone());
        let queue = self
            .search_queues
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let outcome = {
            let _turn = queue.lock().await;
            if self.searched.lock().unwrap().remove(&row.id) {
                // The search before this one dealt with the row.
                Ok(())
            } else {
                self.search_leased(row).await
            }
        };
        let mut queues = self.search_queues.lock().unwrap();
        // Only the map and this task hold the queue: nobody else waits for it.
        if queues.get(&key).is_some_and(|q| Arc::strong_count(q) == 2) {
            queues.remove(&key);
        }
        outcome
    }

    /// [`Worker::search`] under the originator's lease (`dingsync.outbox_search`).
    async fn search_leased(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let (pool, corp) = (&self.pool, self.corp_id.as_str());
        let (code, originator) = (&row.process_code, &row.originator_user_id);
        let Some(held) = store::take_search(pool, corp, code, originator, self.lease()).await?
        else {
            tracing::debug!(
                outbox_id = row.id,
                "outbox: another replica is searching this originator's instances; waiting"
            );
            store::record_unknown(
                pool,
                corp,
                &[row.id],
                "another replica is searching DingTalk for this originator's instances; waiting for it",
                self.settle(),
            )
            .await?;
            return Ok(());
        };
        let outcome = self.resolve(row).await;
        if let Err(e) = store::end_search(pool, corp, code, originator, held).await {
            // The lease runs out by itself.
            tracing::warn!(error = %e, "outbox: could not give back the search lease");
        }
        outcome
    }

    /// Where the instance of `row`'s create may be, by DingTalk's create time.
    fn window(&self, row: &OutboxRow) -> (DateTime<Utc>, DateTime<Utc>) {
        let sent_at = row.sent_at.unwrap_or(row.created_at);
        let after = TimeDelta::from_std(self.lease() / 2 + self.settle())
            .unwrap_or(TimeDelta::days(1))
            + CLOCK_SKEW;
        (
            sent_at.checked_sub_signed(CLOCK_SKEW).unwrap_or(sent_at),
            sent_at.checked_add_signed(after).unwrap_or(sent_at),
        )
    }

    async fn resolve(&self, claimed: &OutboxRow) -> anyhow::Result<()> {
        let (pool, corp) = (&self.pool, self.corp_id.as_str());
        let (code, originator) = (&claimed.process_code, &claimed.originator_user_id);
        let in_doubt = store::in_doubt(
            pool,
            corp,
            code,
            originator,
            self.lease() / 2 + self.settle(),
        )
        .await?;
        let searching: HashSet<i64> = self.searching.lock().unwrap().clone();
        let mut sending = Vec::new();
        let mut parties = Vec::new();
        for r in in_doubt {
            let window = self.window(&r.row);
            if r.row.state == "sending" {
                sending.push(window);
                continue;
            }
            // A row whose request cannot be built is failed by its own claim.
            let Ok(request) = request::create_request(&r.row) else {
                continue;
            };
            parties.push(Party {
                // Claimed for a search by this worker: due, so settled.
                settled: r.settled || searching.contains(&r.row.id),
                row: r.row,
                request,
                window,
                doubtful: false,
                blocked: false,
                adopted: None,
            });
        }
        if !parties.iter().any(|p| p.row.id == claimed.id) {
            // Resolved meanwhile (adopted by another search, or sent again).
            return Ok(());
        }
        for p in &mut parties {
            p.blocked = sending
                .iter()
                .any(|w| w.0 <= p.window.1 && p.window.0 <= w.1);
        }
        let now = Utc::now();
        // Rows of the claimed one's originator still being sent: their creates may be among the
        // instances, their answers on the way. Wait for them (they end within half the lease),
        // and so search once for the whole burst; but not for ever behind an originator who
        // never stops sending: at most half a lease after the oldest row became searchable (a
        // lost answer is then resolved about a lease and a half after its send at the latest,
        // 90 s at the defaults, even while its originator keeps creating).
        let oldest = parties
            .iter()
            .filter(|p| p.settled)
            .map(|p| p.row.sent_at.unwrap_or(p.row.created_at))
            .min()
            .unwrap_or(now);
        let patience = TimeDelta::from_std(self.lease() + self.settle()).unwrap_or_default();
        if parties.iter().any(|p| p.settled && p.blocked) && oldest + patience > now {
            let ids = self.settled_ids(&parties, claimed.id);
            store::record_unknown(
                pool,
                corp,
                &ids,
                "waiting for creates of the same originator still in flight before searching",
                self.settle(),
            )
            .await?;
            return Ok(());
        }

        let found = match self.find(claimed, &parties, now).await {
            Ok(found) => found,
            Err(e) => {
                let delay = self.search_backoff(claimed);
                tracing::info!(outbox_id = claimed.id, error = %format!("{e:#}"), ?delay, "outbox: cannot search DingTalk now; the rows stay unknown");
                let why =
                    format!("searching DingTalk for the instance failed ({e:#}); trying again");
                let ids = self.settled_ids(&parties, claimed.id);
                store::record_unknown(pool, corp, &ids, &why, delay).await?;
                return Ok(());
            }
        };
        let (found, fetched) = found;
        pair(&mut parties, &found, read_precision(self.client.family()));

        let mut dealt = Vec::new();
        for p in &parties {
            if let Some(instance_id) = &p.adopted {
                if store::record_created(pool, corp, p.row.id, instance_id).await? {
                    tracing::info!(outbox_id = p.row.id, process_instance_id = %instance_id, "outbox: unanswered create found in DingTalk; adopted");
                } else if p.settled {
                    // Resolved elsewhere meanwhile, or the instance was taken: look again.
                    store::record_unknown(
                        pool,
                        corp,
                        &[p.row.id],
                        "the instance found could not be adopted; searching again",
                        self.settle(),
                    )
                    .await?;
                }
                dealt.push(p.row.id);
            } else if p.settled && (p.doubtful || p.blocked) {
                store::record_unknown(
                    pool,
                    corp,
                    &[p.row.id],
                    "an instance of this request may still be another row's; searching again",
                    self.settle(),
                )
                .await?;
                dealt.push(p.row.id);
            } else if p.settled {
                // DingTalk holds no instance for this row: the create never took effect.
                self.not_created(
                    &p.row,
                    "the create got no answer and DingTalk holds no such instance",
                )
                .await?;
                dealt.push(p.row.id);
            }
        }
        self.mark_searched(&dealt, claimed.id);

        // After the adoptions: an adoption asks for a detail fetch unless the approval's events
        // already did, and a snapshot answers only the requests made before it.
        for (snapshot, requested_at) in fetched {
            let applied = async {
                let mut conn = pool.acquire().await?;
                approvals::apply_snapshot(
                    &mut conn,
                    corp,
                    &snapshot,
                    requested_at,
                    SnapshotSource::Search,
                    Some(code),
                )
                .await
            }
            .await;
            if let Err(e) = applied {
                // The detail fetch its events asked for applies it instead.
                tracing::warn!(process_instance_id = %snapshot.process_instance_id, error = %e, "outbox: could not store the snapshot a search fetched");
            }
        }
        Ok(())
    }

    /// The settled rows (the claimed one among them), marked as dealt with for the searches
    /// queued behind this one.
    fn settled_ids(&self, parties: &[Party], claimed: i64) -> Vec<i64> {
        let ids: Vec<i64> = parties
            .iter()
            .filter(|p| p.settled)
            .map(|p| p.row.id)
            .collect();
        self.mark_searched(&ids, claimed);
        ids
    }

    /// Rows this worker claimed for a search, dealt with here: their own tasks stop at once.
    fn mark_searched(&self, ids: &[i64], claimed: i64) {
        let searching = self.searching.lock().unwrap();
        let mut searched = self.searched.lock().unwrap();
        for id in ids {
            if *id != claimed && searching.contains(id) {
                searched.insert(*id);
            }
        }
    }

    /// Lists the settled rows' windows (merged where they overlap) and reads every listed
    /// instance no outbox row owns: from its stored snapshot, or with a `get`. Returns the
    /// instances, and the snapshots fetched with when each was requested.
    async fn find(
        &self,
        claimed: &OutboxRow,
        parties: &[Party],
        now: DateTime<Utc>,
    ) -> anyhow::Result<(Vec<Found>, Vec<(Snapshot, DateTime<Utc>)>)> {
        let (pool, corp) = (&self.pool, self.corp_id.as_str());
        let mut windows: Vec<(DateTime<Utc>, DateTime<Utc>)> = parties
            .iter()
            .filter(|p| p.settled)
            .map(|p| (p.window.0, p.window.1.min(now)))
            .collect();
        windows.sort();
        let mut spans: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
        for w in windows {
            match spans.last_mut() {
                Some(last) if w.0 <= last.1 => last.1 = last.1.max(w.1),
                _ => spans.push(w),
            }
        }
        let mut ids: Vec<String> = Vec::new();
        for (since, until) in spans {
            let mut listing = self.client.list_ids(
                &claimed.process_code,
                (since.timestamp_millis(), until.timestamp_millis()),
                Some(&claimed.originator_user_id),
                Purpose::Search,
            );
            while let Some(page) = listing.next_page().await.context("listids")? {
                ids.extend(page);
            }
        }
        let mut seen = HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
        let owned: HashSet<String> = store::owned_instances(pool, corp, &ids)
            .await?
            .into_iter()
            .collect();
        ids.retain(|id| !owned.contains(id));
        let known: HashMap<String, approvals::Started> = approvals::started(pool, corp, &ids)
            .await?
            .into_iter()
            .map(|s| (s.process_instance_id.clone(), s))
            .collect();
        let mut found = Vec::with_capacity(ids.len());
        let mut fetched = Vec::new();
        for (order, id) in ids.into_iter().enumerate() {
            if let Some(s) = known.get(&id) {
                found.push(Found {
                    created_at: s.created_at,
                    order,
                    originator: s.originator_userid.clone(),
                    form_values: s.form_values.as_array().cloned().unwrap_or_default(),
                    id,
                });
                continue;
            }
            let requested_at = approvals::clock(pool).await?;
            let instance = self
                .client
                .get_instance(&id, Purpose::Search)
                .await
                .context("get")?;
            let snapshot = Snapshot::from_instance(&id, &instance);
            found.push(Found {
                created_at: snapshot.as_ref().ok().and_then(|s| s.created_at),
                order,
                originator: instance.originator_userid.clone(),
                form_values: instance.form_component_values.clone(),
                id,
            });
            match snapshot {
                Ok(snapshot) => fetched.push((snapshot, requested_at)),
                Err(e) => {
                    tracing::warn!(process_instance_id = %found.last().unwrap().id, error = %e, "outbox: a searched instance cannot be stored; compared as read")
                }
            }
        }
        // Oldest first; an instance whose create time is unreadable last.
        found.sort_by_key(|f| (f.created_at.is_none(), f.created_at, f.order));
        Ok((found, fetched))
    }
}

/// How finely a create time read back with `get` is given: to the second by the old family
/// (docs/dingtalk.md §2.3, covered by [`CLOCK_SKEW`]), to the minute by v1.0 (§11.3), so an
/// instance made inside a row's window may read as made up to 59 s before it.
fn read_precision(family: ApiFamily) -> TimeDelta {
    match family {
        ApiFamily::Legacy => TimeDelta::zero(),
        ApiFamily::V1 => TimeDelta::minutes(1),
    }
}

/// Gives each instance, oldest first, to the oldest row without one whose request it matches and
/// whose window holds its create time (read to `precision`: the window's start is taken back to
/// the last whole `precision`, the most a read time can lag). A settled row that could have had
/// an instance which went to a row not yet settled becomes `doubtful`: that row's own instance
/// may not be visible yet.
fn pair(parties: &mut [Party], found: &[Found], precision: TimeDelta) {
    let floor = |t: DateTime<Utc>| match precision.num_seconds() {
        0 => t,
        secs => DateTime::from_timestamp(t.timestamp().div_euclid(secs) * secs, 0).unwrap_or(t),
    };
    for f in found {
        let fits = |p: &Party| {
            request::matches_read(&p.request, f.originator.as_deref(), &f.form_values)
                && f.created_at
                    .is_none_or(|t| floor(p.window.0) <= t && t <= p.window.1)
        };
        let Some(taker) = parties.iter().position(|p| p.adopted.is_none() && fits(p)) else {
            continue;
        };
        parties[taker].adopted = Some(f.id.clone());
        if !parties[taker].settled {
            for p in parties.iter_mut() {
                if p.settled && p.adopted.is_none() && fits(p) {
                    p.doubtful = true;
                }
            }
        }
    }
}
