//! Human incident references (`INC-2026-000123`), reserved in blocks ahead of need on
//! PostgreSQL so a new incident's write does not wait for a reference of its own.

use tokio::sync::oneshot;

use crate::persistence::incidents as store;

/// How many incident references the directory reserves at a time on PostgreSQL.
pub(super) const REFERENCE_BLOCK: i64 = 100;

/// A new incident's reference: at hand, or promised by the block being reserved.
pub(super) enum ReferenceTicket {
    Ready(String),
    Waiting(oneshot::Receiver<Option<String>>),
}

/// Incident references reserved in advance (PostgreSQL), so a new incident does not commit
/// an upsert of its own on the way to its first offer (a durable commit: about a millisecond
/// on a loaded machine). One block is reserved at a time, the next when half of the current
/// one is used; an incident that finds none at hand waits for the block in flight, and the
/// waiters are served in arrival order. Numbers are unique and increase in the order incidents
/// are opened on one node; numbers unused when the server stops are never handed out (a gap
/// after a restart), and several nodes sharing a database interleave their blocks.
#[derive(Debug, Default)]
pub(super) struct ReferenceBlocks {
    /// Year, next number, last number.
    current: Option<(i32, i64, i64)>,
    /// The block reserved while the current one still had numbers.
    upcoming: Option<(i32, i64, i64)>,
    pub(super) refilling: bool,
    pub(super) waiting: std::collections::VecDeque<oneshot::Sender<Option<String>>>,
}

/// Numbers left in `block` for `year`.
fn left(block: Option<(i32, i64, i64)>, year: i32) -> i64 {
    block
        .filter(|(y, _, _)| *y == year)
        .map_or(0, |(_, next, last)| (last - next + 1).max(0))
}

impl ReferenceBlocks {
    /// The next reserved reference of `year`, if one is at hand.
    pub(super) fn take(&mut self, year: i32) -> Option<String> {
        if left(self.current, year) == 0 {
            self.current = self.upcoming.take();
        }
        match &mut self.current {
            Some((y, next, last)) if *y == year && *next <= *last => {
                let number = *next;
                *next += 1;
                Some(store::format_reference(year, number))
            }
            _ => None,
        }
    }

    /// Whether to reserve the next block now.
    pub(super) fn wants_refill(&self, year: i32) -> bool {
        !self.refilling
            && self.upcoming.is_none()
            && (left(self.current, year) < REFERENCE_BLOCK / 2 || !self.waiting.is_empty())
    }

    /// A new block: the waiters are served from it first, in order.
    pub(super) fn install(&mut self, year: i32, first: i64, last: i64) {
        if left(self.current, year) == 0 {
            self.current = Some((year, first, last));
        } else {
            self.upcoming = Some((year, first, last));
        }
        while let Some(waiter) = self.waiting.pop_front() {
            if waiter.is_closed() {
                continue;
            }
            match self.take(year) {
                Some(reference) => {
                    let _ = waiter.send(Some(reference));
                }
                None => {
                    self.waiting.push_front(waiter);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn references_come_from_blocks_in_order_and_waiters_are_served_first() {
        let mut blocks = ReferenceBlocks::default();
        assert_eq!(blocks.take(2026), None);
        assert!(blocks.wants_refill(2026));
        let (tx, mut rx) = oneshot::channel();
        blocks.waiting.push_back(tx);
        blocks.install(2026, 1, 3);
        assert_eq!(rx.try_recv().unwrap(), Some("INC-2026-000001".to_owned()));
        assert_eq!(blocks.take(2026).as_deref(), Some("INC-2026-000002"));
        // Low: the next block is reserved while this one still has a number, and follows it.
        assert!(blocks.wants_refill(2026));
        blocks.install(2026, 4, 5);
        assert!(!blocks.wants_refill(2026), "one block ahead at most");
        let taken: Vec<_> = (0..4).map(|_| blocks.take(2026)).collect();
        assert_eq!(
            taken,
            [
                Some("INC-2026-000003".to_owned()),
                Some("INC-2026-000004".to_owned()),
                Some("INC-2026-000005".to_owned()),
                None
            ]
        );
        // A new year starts from its own block.
        blocks.install(2026, 6, 200);
        assert_eq!(blocks.take(2027), None);
    }
}
