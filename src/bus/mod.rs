//! The buses: message brokers as an ingest and an outbound edge beside `http/`.
//!
//! - [`amqp`]: RabbitMQ as SHERS's own services speak it. Readings in from `wearable.data`
//!   (each node a competing consumer, every reading through the [`DeviceRouter`]); the
//!   lifecycle out on SHERS's routing keys and every stored event on `shers.event.<kind>`,
//!   relayed from the event store by sequence with a stored cursor.
//! - [`mqtt`]: wearables and gateways publishing to a broker.
//!
//! The buses know nothing of the cluster: a node starts the ingest with its device router, and
//! the relay runs inside the application, which a cluster runs only while it holds the
//! dispatch shard. Both are off until their `url` is set. A broker outage never fails
//! readiness: `/readyz` reports each configured bus as `connected` or `connecting`
//! ([`links`]).
//!
//! [`DeviceRouter`]: crate::actors::device::DeviceRouter

pub mod amqp;
pub mod mqtt;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::actors::device::DeviceRouter;
use crate::config::Settings;
use crate::persistence::Db;

/// What the ingest edges need: where readings go, the bound on readings in flight (shared
/// with HTTP), and the database (devices bound to their patients on first sight).
#[derive(Clone)]
pub struct IngestDeps {
    /// The wearables, wherever their actors run.
    pub devices: Arc<dyn DeviceRouter>,
    /// Readings in flight, shared with the HTTP ingest.
    pub gate: Arc<tokio::sync::Semaphore>,
    /// The database (unfenced: binding a device is no dispatch work).
    pub db: Db,
    /// Turns true when the process stops: consumers stop taking deliveries.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// This process's name on the brokers: the cluster node id, or the host name of a single
    /// node ([`host_name`]). The MQTT client id is `shers-<node_name>` unless configured.
    pub node_name: String,
}

/// This machine's host name (`/etc/hostname`, else `$HOSTNAME`, else `shers`): a single
/// node's [`IngestDeps::node_name`].
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "shers".to_owned())
}

/// Starts the configured ingest edges (AMQP `wearable.data`, MQTT vitals); nothing when no bus
/// is configured.
pub fn start_ingest(settings: &Settings, deps: IngestDeps) {
    if settings.amqp.url.is_some() && settings.amqp.ingest {
        amqp::spawn_ingest(settings.amqp.clone(), deps.clone());
    }
    if settings.mqtt.url.is_some() {
        mqtt::spawn_ingest(settings.mqtt.clone(), settings.http.body_limit_bytes, deps);
    }
}

/// Starts the outbound relay of the event store to the configured buses (AMQP publish), over
/// `db` (fenced in a cluster: the relay runs with the dispatch shard); it stops when `closing`
/// turns true.
pub fn start_relay(settings: &Settings, db: Db, closing: tokio::sync::watch::Receiver<bool>) {
    if settings.amqp.url.is_some() && settings.amqp.publish {
        amqp::spawn_relay(settings.amqp.clone(), db, closing);
    }
}

/// The connections a bus wants and how many of them are up, for `/readyz`.
#[derive(Debug, Default)]
pub struct Link {
    wanted: AtomicUsize,
    up: AtomicUsize,
}

/// A bus connection's state, as `/readyz` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Every connection this process wants to the broker is up.
    Connected,
    /// At least one is being (re)established.
    Connecting,
}

impl Link {
    /// Registers one connection this process keeps to the broker; it counts as wanted until
    /// the guard is dropped.
    pub fn want(&'static self) -> LinkGuard {
        self.wanted.fetch_add(1, Ordering::AcqRel);
        LinkGuard {
            link: self,
            up: false,
        }
    }

    /// `None` when this process keeps no connection to the broker (the bus is off here).
    pub fn state(&self) -> Option<LinkState> {
        let wanted = self.wanted.load(Ordering::Acquire);
        if wanted == 0 {
            return None;
        }
        Some(if self.up.load(Ordering::Acquire) >= wanted {
            LinkState::Connected
        } else {
            LinkState::Connecting
        })
    }
}

/// One wanted connection of a [`Link`]: mark it up or down as the connection comes and goes.
pub struct LinkGuard {
    link: &'static Link,
    up: bool,
}

impl LinkGuard {
    /// The connection is up (or down).
    pub fn set_up(&mut self, up: bool) {
        if up != self.up {
            self.up = up;
            if up {
                self.link.up.fetch_add(1, Ordering::AcqRel);
            } else {
                self.link.up.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.set_up(false);
        self.link.wanted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// This process's connections to RabbitMQ.
pub fn amqp_link() -> &'static Link {
    static LINK: Link = Link {
        wanted: AtomicUsize::new(0),
        up: AtomicUsize::new(0),
    };
    &LINK
}

/// This process's connection to the MQTT broker.
pub fn mqtt_link() -> &'static Link {
    static LINK: Link = Link {
        wanted: AtomicUsize::new(0),
        up: AtomicUsize::new(0),
    };
    &LINK
}

/// The buses as `/readyz` reports them: a key per configured bus.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Links {
    /// RabbitMQ, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<LinkState>,
    /// The MQTT broker, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<LinkState>,
}

/// This process's bus connections, for `/readyz`.
pub fn links() -> Links {
    Links {
        amqp: amqp_link().state(),
        mqtt: mqtt_link().state(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_connected_only_when_every_wanted_connection_is_up() {
        static LINK: Link = Link {
            wanted: AtomicUsize::new(0),
            up: AtomicUsize::new(0),
        };
        assert_eq!(LINK.state(), None);
        let mut a = LINK.want();
        let mut b = LINK.want();
        assert_eq!(LINK.state(), Some(LinkState::Connecting));
        a.set_up(true);
        a.set_up(true);
        assert_eq!(LINK.state(), Some(LinkState::Connecting));
        b.set_up(true);
        assert_eq!(LINK.state(), Some(LinkState::Connected));
        b.set_up(false);
        assert_eq!(LINK.state(), Some(LinkState::Connecting));
        drop(b);
        assert_eq!(LINK.state(), Some(LinkState::Connected));
        drop(a);
        assert_eq!(LINK.state(), None);
    }
}
