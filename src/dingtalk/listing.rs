//! The one paginator of instance ids, either family (`topapi/processinstance/listids`,
//! docs/dingtalk.md §2.4; v1.0 `processes/instanceIds/query`, §11.4): the instance ids of one
//! template created in a window, optionally only one originator's, page by page. The outbox's
//! lost-answer search, the backfill job and the drift report all list through it.
//!
//! Page size: DingTalk's page documents at most 20 ids a page; a comment in its Java SDK says 10
//! (unconfirmed). Every page is a metered call, so we ask for 20, which halves the calls of a long
//! listing. A DingTalk that gave fewer per page would still be listed completely: the next page
//! starts at the `next_cursor` DingTalk returns, not at a count we assume.

use super::{Client, Error, Purpose, types::ListIds};

/// Ids asked for per page.
pub const PAGE: u32 = 20;
/// Most ids one listing reaches: past them DingTalk ends the listing without saying there are
/// more (docs/dingtalk.md §2.4).
pub const ID_CAP: u64 = 10_000;

/// A listing in progress; [`IdListing::next_page`] fetches the next page.
pub struct IdListing<'a> {
    client: &'a Client,
    request: ListIds,
    purpose: Purpose,
    finished: bool,
    capped: bool,
}

impl Client {
    /// Lists `process_code`'s instances created from `start_ms` to `end_ms` (epoch ms, within one
    /// 120-day window), only `originator`'s when given, from the first page.
    pub fn list_ids(
        &self,
        process_code: &str,
        (start_ms, end_ms): (i64, i64),
        originator: Option<&str>,
        purpose: Purpose,
    ) -> IdListing<'_> {
        IdListing {
            client: self,
            request: ListIds {
                process_code: process_code.to_string(),
                start_time: start_ms,
                end_time: Some(end_ms),
                size: PAGE,
                cursor: 0,
                userid_list: originator.map(str::to_string),
                statuses: Vec::new(),
            },
            purpose,
            finished: false,
            capped: false,
        }
    }
}

impl IdListing<'_> {
    /// Lists only instances in `statuses` (`RUNNING`, `TERMINATED`, `COMPLETED`): v1.0 only
    /// (docs/dingtalk.md §11.4); with the old family the first page is refused unsent
    /// ([`Client::filters_by_status`] says which).
    pub fn with_statuses(mut self, statuses: &[&str]) -> Self {
        self.request.statuses = statuses.iter().map(|s| (*s).to_string()).collect();
        self
    }

    /// Continues a listing at `cursor` (a value of [`IdListing::cursor`] saved earlier).
    pub fn resume_at(mut self, cursor: u64) -> Self {
        self.request.cursor = cursor;
        self
    }

    /// Where the next page starts: save it to resume the listing later.
    pub fn cursor(&self) -> u64 {
        self.request.cursor
    }

    /// The next page of ids; `None` once the listing is complete.
    pub async fn next_page(&mut self) -> Result<Option<Vec<String>>, Error> {
        if self.finished {
            return Ok(None);
        }
        let page = self
            .client
            .list_instance_ids(&self.request, self.purpose)
            .await?;
        let reached = self.request.cursor + page.list.len() as u64;
        match page.next_cursor {
            // A cursor that does not move on would list the same page for ever.
            Some(next) if next > self.request.cursor => self.request.cursor = next,
            _ => {
                self.finished = true;
                self.capped = reached >= ID_CAP;
            }
        }
        Ok(Some(page.list))
    }

    /// The last page has been fetched.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The listing ended at DingTalk's id cap: the window may hold more instances than it
    /// listed, so a shorter window must be listed instead.
    pub fn capped(&self) -> bool {
        self.capped
    }
}
