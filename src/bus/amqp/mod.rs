//! RabbitMQ (AMQP 0-9-1) as SHERS's services speak it (docs/interop.md §1): one durable topic
//! exchange (`amqp.exchange`, `amqp.topic` by default), bodies UTF-8 JSON, no custom headers.
//!
//! - [`spawn_ingest`]: SHERS's `wearable.data` messages become readings through the device
//!   router, acknowledged once applied; what can never be applied is dead-lettered once, a
//!   transient failure is retried while the delivery is held (prefetch bounds the backlog).
//! - [`spawn_relay`]: the event store, in sequence order from a stored cursor, onto the
//!   exchange: every event on `shers.event.<kind>` and the lifecycle on SHERS's routing keys,
//!   confirmed by the broker before the cursor moves (at least once, stable `message_id`s).
//!
//! Every connection reconnects with jittered back-off when the broker goes away, and counts in
//! [`amqp_link`](super::amqp_link) for `/readyz`.

mod ingest;
mod relay;
mod shers;

pub use ingest::spawn_ingest;
pub use relay::{CURSOR, spawn_relay};

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpSettings;

/// The routing key SHERS's wearables publish readings on.
pub const WEARABLE_DATA: &str = "wearable.data";

/// The names SHERS declares on the broker, from `amqp.exchange` and `amqp.queue_prefix`.
#[derive(Clone, Debug)]
pub struct Names {
    /// The shared topic exchange.
    pub exchange: String,
    /// `<prefix>.q.wearable-data`: the readings, bound to `wearable.data`.
    pub ingest_queue: String,
    /// `<prefix>.dlx`: where refused deliveries go (fanout).
    pub dead_letter_exchange: String,
    /// `<prefix>.q.dead-letter`: what was refused, for people to look at.
    pub dead_letter_queue: String,
}

impl Names {
    /// The names of a deployment configured with `settings`.
    pub fn of(settings: &AmqpSettings) -> Self {
        let prefix = &settings.queue_prefix;
        Self {
            exchange: settings.exchange.clone(),
            ingest_queue: format!("{prefix}.q.wearable-data"),
            dead_letter_exchange: format!("{prefix}.dlx"),
            dead_letter_queue: format!("{prefix}.q.dead-letter"),
        }
    }
}

/// Opens a connection named `name` (shown in the broker's management UI) to `amqp.url`;
/// `amqps://` is TLS on rustls, trusting the public roots and `amqp.ca_file`.
pub(crate) async fn connect(settings: &AmqpSettings, name: &str) -> anyhow::Result<Connection> {
    let Some(url) = &settings.url else {
        anyhow::bail!("amqp.url is not set");
    };
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: match &settings.ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading amqp.ca_file {}: {e}", path.display()))?,
            ),
            None => None,
        },
    };
    let connecting = Connection::connect_with_config(
        url.expose(),
        ConnectionProperties::default().with_connection_name(name.into()),
        tls,
        lapin::runtime::default_runtime()?,
    );
    // A broker that is stopping (or a host that accepts TCP but never speaks AMQP) would
    // otherwise hold the handshake forever, and the reconnect loop with it.
    Ok(within("the AMQP handshake", connecting).await??)
}

/// How long one broker exchange of setting up a connection (the handshake, a declaration, a
/// consumer) may take before the connection is given up and made again.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// `step`, or an error naming `what` after [`SETUP_TIMEOUT`].
pub(crate) async fn within<T>(
    what: &str,
    step: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(SETUP_TIMEOUT, step)
        .await
        .map_err(|_| anyhow::anyhow!("{what} took longer than {SETUP_TIMEOUT:?}"))
}

/// Declares the shared exchange: durable, type topic; a no-op when it exists as such.
pub(crate) async fn declare_exchange(channel: &Channel, names: &Names) -> lapin::Result<()> {
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the ingest queue bound to `wearable.data`, with its dead-letter exchange and queue.
pub(crate) async fn declare_ingest(channel: &Channel, names: &Names) -> lapin::Result<()> {
    declare_exchange(channel, names).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            names.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            names.dead_letter_queue.as_str().into(),
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            names.dead_letter_queue.as_str().into(),
            names.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dead_letter_exchange.as_str().into()),
    );
    channel
        .queue_declare(names.ingest_queue.as_str().into(), durable, arguments)
        .await?;
    channel
        .queue_bind(
            names.ingest_queue.as_str().into(),
            names.exchange.as_str().into(),
            WEARABLE_DATA.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Reconnection back-off: 0.5 s doubling to 5 s, with up to 25 % jitter so the nodes of a
/// cluster do not reconnect in step after a broker restart. Short: readings wait in the
/// broker while SHERS is away, and a connection attempt costs the broker little.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait before the next attempt.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter_ms =
            u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * wait.as_millis() as u64 / 4 / 255;
        wait + Duration::from_millis(jitter_ms)
    }

    /// Connected again: the next loss starts from the first wait.
    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Waits `wait`, or less when `closing` turns true; whether the process is closing.
pub(crate) async fn pause(
    wait: Duration,
    closing: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *closing.borrow() {
        return true;
    }
    let woken = tokio::select! {
        () = tokio::time::sleep(wait) => false,
        _ = closing.wait_for(|c| *c) => true,
    };
    woken || *closing.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_queue_prefix() {
        let settings = AmqpSettings {
            queue_prefix: "east".to_owned(),
            ..AmqpSettings::default()
        };
        let names = Names::of(&settings);
        assert_eq!(names.exchange, "amqp.topic");
        assert_eq!(names.ingest_queue, "east.q.wearable-data");
        assert_eq!(names.dead_letter_exchange, "east.dlx");
        assert_eq!(names.dead_letter_queue, "east.q.dead-letter");
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_and_starts_over_after_a_reset() {
        let mut b = Backoff::new();
        let first = b.next_wait();
        assert!(first >= Backoff::FIRST && first <= Backoff::FIRST * 5 / 4);
        for _ in 0..20 {
            assert!(b.next_wait() <= Backoff::MAX * 5 / 4);
        }
        b.reset();
        assert!(b.next_wait() <= Backoff::FIRST * 5 / 4);
    }
}
