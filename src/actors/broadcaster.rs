//! `Broadcaster`: every connected console sees every event, in order, with no gap and no
//! duplicate at the seam between replay and live.
//!
//! The event store's sequence is gap-free and commits become visible in sequence order, so
//! the broadcaster simply tails it (woken by each commit, this process's or, on a cluster,
//! another node's over Redis; polling as a fallback) and fans each
//! event out to every subscriber through a bounded buffer. A subscriber whose buffer is full is
//! dropped rather than slowing everyone; its feed notices, tells the client to resync from its
//! last sequence, replays from the store and subscribes again.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytestring::ByteString;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::domain::events::RecordedEvent;
use crate::persistence::{Db, StoreError, events};

/// Events buffered per subscriber before it is told to resync.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// Longest wait between looks at the store when no commit woke the broadcaster.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Events read per look.
const PAGE: i64 = 1000;

/// An event on its way to many consoles: serialised to JSON at most once, however many
/// consoles send it (the text is shared, not copied).
#[derive(Debug)]
pub struct Broadcast {
    event: RecordedEvent,
    json: OnceLock<ByteString>,
}

impl Broadcast {
    /// Wraps `event` for fan-out.
    pub fn new(event: RecordedEvent) -> Self {
        Self {
            event,
            json: OnceLock::new(),
        }
    }

    /// The event as JSON (the console frame and the SSE `data:`), serialised on first use.
    pub fn json(&self) -> ByteString {
        self.json
            .get_or_init(|| {
                serde_json::to_string(&self.event)
                    .unwrap_or_default()
                    .into()
            })
            .clone()
    }
}

impl Deref for Broadcast {
    type Target = RecordedEvent;

    fn deref(&self) -> &RecordedEvent {
        &self.event
    }
}

/// The fan-out hub.
pub struct Broadcaster {
    db: Db,
    head: i64,
    next_id: u64,
    subscribers: HashMap<u64, mpsc::Sender<Arc<Broadcast>>>,
}

impl Broadcaster {
    /// A hub starting at the store's current head (send nothing older: feeds replay that).
    pub async fn new(db: Db) -> Result<Self, StoreError> {
        let head = db
            .run(|mut conn| async move { events::last_seq(&mut conn).await })
            .await?;
        Ok(Self {
            db,
            head,
            next_id: 1,
            subscribers: HashMap::new(),
        })
    }

    fn tail(&mut self, ctx: &mut Context<Self>) {
        let (db, since) = (self.db.clone(), self.head);
        if self.subscribers.is_empty() {
            // Nobody listens: no page reads per commit, just keep the head roughly current so
            // a first subscriber's replay is short.
            ctx.spawn(
                async move {
                    tokio::time::sleep(POLL_INTERVAL).await;
                    db.run(|mut conn| async move { events::last_seq(&mut conn).await })
                        .await
                }
                .into_actor(self)
                .map(|head, act, ctx| {
                    // Someone who subscribed meanwhile was promised every event after the old
                    // head: then the head must not jump, and the next look reads from it.
                    if let Ok(head) = head
                        && act.subscribers.is_empty()
                    {
                        act.head = act.head.max(head);
                    }
                    act.tail(ctx);
                }),
            );
            return;
        }
        ctx.spawn(
            async move {
                let notified = events::appended().notified();
                let elsewhere = events::appended_elsewhere().notified();
                let page =
                    db.run(move |mut conn| async move {
                        events::read_since(&mut conn, since, PAGE).await
                    })
                    .await;
                // Events found go out at once (the next look follows straight after). An empty
                // or failed look waits, for a commit or the poll interval; `notified` was
                // created before the read, so a commit during the read is not missed.
                if !page.as_ref().is_ok_and(|p| !p.is_empty()) {
                    let woken = async {
                        tokio::select! {
                            () = notified => {}
                            () = elsewhere => {}
                        }
                    };
                    let _ = tokio::time::timeout(POLL_INTERVAL, woken).await;
                }
                page
            }
            .into_actor(self)
            .map(|page, act, ctx| {
                match page {
                    Ok(page) => {
                        for event in page {
                            act.head = act.head.max(event.seq);
                            let event = Arc::new(Broadcast::new(event));
                            act.subscribers
                                .retain(|_, tx| tx.try_send(event.clone()).is_ok());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "event tail failed; retrying"),
                }
                act.tail(ctx);
            }),
        );
    }
}

impl Actor for Broadcaster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.tail(ctx);
    }
}

/// Subscribe to live events: returns an id, the receiver and the head at subscription (every
/// event after it will be delivered, unless the buffer overflows and the channel closes).
#[derive(Message)]
#[rtype(result = "(u64, mpsc::Receiver<Arc<Broadcast>>, i64)")]
pub struct Subscribe;

impl Handler<Subscribe> for Broadcaster {
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, _: Subscribe, _: &mut Self::Context) -> Self::Result {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let id = self.next_id;
        self.next_id += 1;
        self.subscribers.insert(id, tx);
        MessageResult((id, rx, self.head))
    }
}

/// Stop delivering to a subscriber.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub u64);

impl Handler<Unsubscribe> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Self::Context) {
        self.subscribers.remove(&msg.0);
    }
}

/// How many consoles and streams are connected.
#[derive(Message, Debug)]
#[rtype(result = "(usize, i64)")]
pub struct Stats;

impl Handler<Stats> for Broadcaster {
    type Result = MessageResult<Stats>;

    fn handle(&mut self, _: Stats, _: &mut Self::Context) -> Self::Result {
        MessageResult((self.subscribers.len(), self.head))
    }
}

/// What a feed yields.
#[derive(Clone, Debug)]
pub enum FeedItem {
    /// The next event.
    Event(Arc<Broadcast>),
    /// The client fell behind: events continue from this sequence after a replay.
    Resync(i64),
}

/// A gap-free feed of every event after `since`: replays from the store, then streams live
/// events, skipping anything already sent at the seam; recovers from overflow by replaying.
/// The returned channel is bounded: a slow reader slows only its own feed.
pub fn feed(db: Db, broadcaster: Addr<Broadcaster>, since: i64) -> mpsc::Receiver<FeedItem> {
    let (tx, rx) = mpsc::channel(256);
    actix::spawn(async move {
        let mut last = since;
        loop {
            // Subscribe first, so nothing committed during the replay is missed.
            let Ok((id, mut live, head)) = broadcaster.send(Subscribe).await else {
                return;
            };
            while last < head {
                let from = last;
                let page =
                    db.run(move |mut conn| async move {
                        events::read_since(&mut conn, from, 500).await
                    })
                    .await;
                let Ok(page) = page else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                if page.is_empty() {
                    break;
                }
                for event in page {
                    if event.seq > head {
                        break;
                    }
                    last = event.seq;
                    if tx
                        .send(FeedItem::Event(Arc::new(Broadcast::new(event))))
                        .await
                        .is_err()
                    {
                        broadcaster.do_send(Unsubscribe(id));
                        return;
                    }
                }
            }
            while let Some(event) = live.recv().await {
                if event.seq <= last {
                    continue;
                }
                last = event.seq;
                if tx.send(FeedItem::Event(event)).await.is_err() {
                    broadcaster.do_send(Unsubscribe(id));
                    return;
                }
            }
            // The live channel closed: this feed overflowed. Say so, then catch up.
            if tx.send(FeedItem::Resync(last)).await.is_err() {
                return;
            }
        }
    });
    rx
}
