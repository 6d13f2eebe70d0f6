//! What every WebSocket session shares: the heartbeat (a ping every [`HEARTBEAT_INTERVAL`], a
//! client silent for [`CLIENT_TIMEOUT`] is closed), pong replies, frame limits and the close
//! handshake ([`Socket`]); and [`Pusher`], the small actor that gives a session a typed
//! [`Recipient`] so hub actors can push to it without holding a socket.
//!
//! A session's own task owns its socket: it selects on [`Socket::next`] and on whatever it
//! is pushed, serialises, and sends. Nothing here knows what the frames mean.

use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use bytestring::ByteString;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

/// How often the server pings a connected client.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client may stay silent (no frame, no pong) before it is disconnected.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What arrived on a socket that its session must act on.
#[derive(Debug)]
pub enum Incoming {
    /// A text frame (continuations already joined).
    Text(ByteString),
    /// A binary frame (no endpoint takes them; the session answers with an error frame).
    Binary,
    /// A heartbeat was sent (a session may add a frame of its own, e.g. the console's).
    Tick,
    /// The connection ended: close it with this reason.
    Closed(Option<CloseReason>),
}

/// One client connection: the session half to send on and the aggregated stream to read.
pub struct Socket {
    session: Session,
    stream: AggregatedMessageStream,
    last_heard: Instant,
    heartbeat: tokio::time::Interval,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Socket {
    /// Wraps a fresh `actix_ws::handle` pair; frames (and joined continuations) over
    /// `frame_limit` bytes end the connection, and so does `closing` turning true (the server
    /// is handing its work to another node: the client is told to reconnect).
    pub fn new(
        session: Session,
        stream: actix_ws::MessageStream,
        frame_limit: usize,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let stream = stream
            .max_frame_size(frame_limit)
            .aggregate_continuations()
            .max_continuation_size(frame_limit);
        Self {
            session,
            stream,
            last_heard: Instant::now(),
            heartbeat: tokio::time::interval(HEARTBEAT_INTERVAL),
            closing,
        }
    }

    /// The next thing the session must act on. Pings are answered and pongs noted here; a
    /// client silent past [`CLIENT_TIMEOUT`] is `Closed` with a policy reason. Cancel-safe
    /// except that a pong being sent when the future is dropped is lost (the client pings
    /// again).
    pub async fn next(&mut self) -> Incoming {
        loop {
            tokio::select! {
                message = self.stream.next() => match message {
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        self.last_heard = Instant::now();
                        return Incoming::Text(text);
                    }
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        self.last_heard = Instant::now();
                        return Incoming::Binary;
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        self.last_heard = Instant::now();
                        if self.session.pong(&bytes).await.is_err() {
                            return Incoming::Closed(None);
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => self.last_heard = Instant::now(),
                    Some(Ok(AggregatedMessage::Close(reason))) => return Incoming::Closed(reason),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket protocol error");
                        return Incoming::Closed(Some(CloseReason {
                            code: CloseCode::Protocol,
                            description: Some("protocol error".to_owned()),
                        }));
                    }
                    None => return Incoming::Closed(None),
                },
                _ = self.closing.wait_for(|closing| *closing) => {
                    return Incoming::Closed(Some(CloseReason {
                        code: CloseCode::Restart,
                        description: Some("this node is handing over; reconnect".to_owned()),
                    }));
                }
                _ = self.heartbeat.tick() => {
                    if self.last_heard.elapsed() > CLIENT_TIMEOUT {
                        return Incoming::Closed(Some(CloseReason {
                            code: CloseCode::Policy,
                            description: Some("heartbeat timeout".to_owned()),
                        }));
                    }
                    if self.session.ping(b"").await.is_err() {
                        return Incoming::Closed(None);
                    }
                    return Incoming::Tick;
                }
            }
        }
    }

    /// Sends one text frame; `Err` when the client is gone.
    pub async fn send(&mut self, text: impl Into<ByteString>) -> Result<(), Gone> {
        self.session.text(text.into()).await.map_err(|_| Gone)
    }

    /// Closes the connection with `reason` (a close frame, if the client is still there).
    pub async fn close(self, reason: Option<CloseReason>) {
        let _ = self.session.close(reason).await;
    }
}

/// The client went away while a frame was being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// How many pushed messages wait for a session before the session is closed as too slow
/// (its client reconnects and is replayed what it must know).
pub const PUSH_QUEUE: usize = 64;

/// A session's inbox for typed messages `M` from hub actors: start it with [`Pusher::start_for`],
/// hand its [`Recipient`] to the hub, and receive in the session's task. Bounded: when the
/// session falls [`PUSH_QUEUE`] messages behind, the pusher stops and the session closes.
pub struct Pusher<M: Message<Result = ()> + Send + 'static> {
    tx: mpsc::Sender<M>,
}

impl<M: Message<Result = ()> + Send + 'static> Pusher<M> {
    /// A pusher on the current arbiter and the receiving end for the session's task.
    pub fn start_for() -> (Recipient<M>, mpsc::Receiver<M>) {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        (Pusher { tx }.start().recipient(), rx)
    }
}

impl<M: Message<Result = ()> + Send + 'static> Actor for Pusher<M> {
    type Context = Context<Self>;
}

impl<M: Message<Result = ()> + Send + 'static> Handler<M> for Pusher<M> {
    type Result = ();

    fn handle(&mut self, msg: M, ctx: &mut Self::Context) {
        // Full (a session too slow to keep up) or closed (the session ended): either way this
        // session is done; dropping the sender ends its receive loop.
        if self.tx.try_send(msg).is_err() {
            ctx.stop();
        }
    }
}
