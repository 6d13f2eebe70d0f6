//! Typed, layered configuration.
//!
//! Precedence (lowest to highest): built-in defaults → the `--config` TOML file → environment
//! (`SHERS_<SECTION>__<KEY>`, plus the conventional `DATABASE_URL`, `REDIS_URL`, `SHERS_BIND`) →
//! command-line flags. Every struct denies unknown fields so a typo fails start-up loudly instead
//! of silently running with a default. Secrets live in [`Secret`], whose `Debug` prints
//! `[REDACTED]`. There is no global config static: the [`Settings`] value is passed in.

use std::fmt;
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

/// A value that must never appear in logs or `Debug` output (database URLs, API keys, tokens).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Reads the secret. Call sites are easy to grep for, which is the point.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// All settings of a SHERS process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Address the HTTP server binds to (`SHERS_BIND`, default `127.0.0.1:8080`; port 0 picks a
    /// free port, which tests use).
    pub bind: String,
    /// Database connection.
    pub database: DatabaseSettings,
    /// Redis: with PostgreSQL, setting it runs this process as a cluster node.
    pub redis: RedisSettings,
    /// Cluster membership and shard leases (used only when running as a cluster).
    pub cluster: ClusterSettings,
    /// HTTP server limits and behaviour.
    pub http: HttpSettings,
    /// Log output.
    pub log: LogSettings,
    /// Token authentication.
    pub auth: AuthSettings,
    /// Vitals triage.
    pub triage: TriageSettings,
    /// Ambulance dispatch.
    pub dispatch: DispatchSettings,
    /// Routing / ETA provider.
    pub routing: RoutingSettings,
    /// Payment provider.
    pub payments: PaymentSettings,
    /// Insurance verification service.
    pub insurance: InsuranceSettings,
    /// Next-of-kin notification providers.
    pub notify: NotifySettings,
    /// Operations and admin endpoints.
    pub admin: AdminSettings,
    /// Crash-point drills (acted on only by `serve --enable-fault-injection`).
    pub fault: FaultSettings,
    /// Response-time standards (seconds per NEMSIS interval) for analytics compliance.
    pub analytics: crate::domain::analytics::Thresholds,
    /// The embedded dashboard.
    pub dashboard: DashboardSettings,
    /// RabbitMQ: SHERS's `wearable.data` in, the lifecycle out (off until `amqp.url` is set).
    pub amqp: AmqpSettings,
    /// MQTT: wearables and gateways on a broker (off until `mqtt.url` is set).
    pub mqtt: MqttSettings,
    /// Offers pushed to crews' phones through FCM (off until `push.fcm_credentials_file`).
    pub push: PushSettings,
}

/// RabbitMQ (AMQP 0-9-1), as SHERS's services speak it: readings in from `wearable.data`,
/// the lifecycle out on their routing keys and every stored event on `shers.event.<kind>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// `amqp://user:pass@host:5672/%2f`, or `amqps://` (TLS on rustls). Unset: off.
    pub url: Option<Secret<String>>,
    /// The topic exchange SHERS's services share (declared durable if missing).
    pub exchange: String,
    /// Consume `wearable.data`.
    pub ingest: bool,
    /// Publish the lifecycle and the event stream.
    pub publish: bool,
    /// Unacknowledged deliveries per consumer: the back-pressure on ingest.
    pub prefetch: u16,
    /// Names SHERS's own queues and dead-letter exchange, so two deployments can share a
    /// broker.
    pub queue_prefix: String,
    /// A PEM file of CA certificates trusted for `amqps://` besides the public roots (a
    /// broker whose certificate a private CA signed).
    pub ca_file: Option<PathBuf>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: None,
            exchange: "amqp.topic".to_owned(),
            ingest: true,
            publish: true,
            prefetch: 64,
            queue_prefix: "shers".to_owned(),
            ca_file: None,
        }
    }
}

impl AmqpSettings {
    fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            let url = url.expose();
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err("amqp.url must start with amqp:// or amqps://".to_owned());
            }
        }
        if self.prefetch == 0 {
            return Err("amqp.prefetch must be at least 1".to_owned());
        }
        for (key, value) in [
            ("amqp.exchange", &self.exchange),
            ("amqp.queue_prefix", &self.queue_prefix),
        ] {
            if value.is_empty() || value.len() > 200 || value.chars().any(char::is_control) {
                return Err(format!(
                    "{key} must be 1 to 200 characters without control characters"
                ));
            }
        }
        Ok(())
    }
}

/// MQTT (3.1.1): wearables and gateways publishing to a broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// `mqtt://user:pass@host:1883`, or `mqtts://` (TLS on rustls). Unset: off.
    pub url: Option<Secret<String>>,
    /// Devices publish under `<topic_prefix>/<device_id>/…`.
    pub topic_prefix: String,
    /// The client id, stable across restarts (a persistent session): `shers-<node id>` in a
    /// cluster, `shers-<host name>` on a single node, when unset.
    pub client_id: Option<String>,
    /// A PEM file of CA certificates trusted for `mqtts://` besides the platform's and the
    /// public roots (a broker whose certificate a private CA signed).
    pub ca_file: Option<PathBuf>,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            url: None,
            topic_prefix: "shers/devices".to_owned(),
            client_id: None,
            ca_file: None,
        }
    }
}

impl MqttSettings {
    fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            let url = url.expose();
            if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) {
                return Err("mqtt.url must start with mqtt:// or mqtts://".to_owned());
            }
        }
        let prefix = &self.topic_prefix;
        if prefix.is_empty()
            || prefix.len() > 200
            || prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.starts_with('$')
            || prefix
                .chars()
                .any(|c| matches!(c, '+' | '#') || c.is_control())
        {
            return Err(
                "mqtt.topic_prefix must be a topic without wildcards, a leading `$` or \
                        slashes at either end"
                    .to_owned(),
            );
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
        {
            return Err("mqtt.client_id must be 1 to 128 characters".to_owned());
        }
        Ok(())
    }
}

/// Dashboard settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardSettings {
    /// Map tile server URL template with `{z}`, `{x}`, `{y}` (e.g. a local OpenStreetMap tile
    /// server, `https://tiles.example.org/{z}/{x}/{y}.png`). Unset draws the map on a plain
    /// background, which needs no network at all.
    pub tile_url: Option<String>,
    /// Attribution text shown on the map when tiles are used (e.g. "© OpenStreetMap").
    pub tile_attribution: Option<String>,
}

impl DashboardSettings {
    /// The tile server's origin (`scheme://host[:port]`), for the page's Content-Security-Policy.
    pub fn tile_origin(&self) -> Option<&str> {
        let url = self.tile_url.as_deref()?;
        let rest = url.split_once("://")?.1;
        let end = url.len() - rest.len() + rest.find('/').unwrap_or(rest.len());
        Some(&url[..end])
    }

    fn check(&self) -> Result<(), String> {
        let Some(url) = self.tile_url.as_deref() else {
            return Ok(());
        };
        let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
        let host_ok = self.tile_origin().is_some_and(|o| !o.ends_with("://"));
        let safe = !url
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | ';' | '<' | '>'));
        if !(scheme_ok && host_ok && safe) {
            return Err("dashboard.tile_url must be an http(s) URL with a host".to_owned());
        }
        for part in ["{z}", "{x}", "{y}"] {
            if !url.contains(part) {
                return Err(format!("dashboard.tile_url must contain {part}"));
            }
        }
        Ok(())
    }
}

/// Operations settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Expose `POST /admin/actors/incident/{id}/crash` (for resilience drills and tests only;
    /// `serve --enable-fault-injection`).
    pub enable_fault_injection: bool,
}

/// Crash-point drills.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// A crash point (`shers fault points` lists them; `SHERS_FAULT__CRASH_AT`): with `serve
    /// --enable-fault-injection` the process aborts, as kill -9 would, the first time it
    /// reaches this point, and an unknown name stops `serve`. Every other subcommand, and
    /// `serve` without the flag, accepts the setting and ignores it.
    pub crash_at: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".to_owned(),
            database: DatabaseSettings::default(),
            redis: RedisSettings::default(),
            cluster: ClusterSettings::default(),
            http: HttpSettings::default(),
            log: LogSettings::default(),
            auth: AuthSettings::default(),
            triage: TriageSettings::default(),
            dispatch: DispatchSettings::default(),
            routing: RoutingSettings::default(),
            payments: PaymentSettings::default(),
            insurance: InsuranceSettings::default(),
            notify: NotifySettings::default(),
            admin: AdminSettings::default(),
            fault: FaultSettings::default(),
            analytics: crate::domain::analytics::Thresholds::default(),
            dashboard: DashboardSettings::default(),
            amqp: AmqpSettings::default(),
            mqtt: MqttSettings::default(),
            push: PushSettings::default(),
        }
    }
}

/// Database connection settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` (embedded default, directory created) or `postgres://…`
    /// (`DATABASE_URL`). Any other scheme is refused.
    pub url: Secret<String>,
    /// Maximum pooled connections (PostgreSQL; SQLite uses at most 4 because it has one writer).
    pub pool_size: usize,
    /// How long opening a database connection may take, in milliseconds, before the request
    /// is answered 503 (unavailable). A request that finds every pooled connection in use
    /// waits for one longer, at least 10 s (then 503, busy): that is contention, waited out,
    /// while an unreachable database fails the opening within this time.
    pub timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("sqlite://data/shers.db".to_owned()),
            pool_size: 16,
            timeout_ms: 2_000,
        }
    }
}

/// Redis settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port/` (`REDIS_URL`); unset runs a single node.
    pub url: Option<Secret<String>>,
}

/// Cluster settings (`SHERS_CLUSTER__*`). A process runs as a cluster node when Redis is
/// configured and the database is PostgreSQL; otherwise it holds every shard alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// This node's name in `/admin/cluster` and the lease table (`SHERS_CLUSTER__NODE_ID`;
    /// default: the host name and a random suffix). Must be unique among live nodes.
    pub node_id: Option<String>,
    /// Where this node serves the shards it owns, for the other nodes' forwarded requests
    /// (`SHERS_CLUSTER__INTERNAL_BIND`, default `127.0.0.1:0`: a free loopback port, right for
    /// nodes on one host; in containers e.g. `0.0.0.0:8081`).
    pub internal_bind: String,
    /// The URL other nodes reach `internal_bind` at (`SHERS_CLUSTER__ADVERTISE_URL`, e.g.
    /// `http://10.0.3.7:8081`); default: `http://` and the bound address, which needs a
    /// concrete (not unspecified) bind address.
    pub advertise_url: Option<String>,
    /// How long a shard lease lasts without renewal, in milliseconds (`SHERS_CLUSTER__LEASE_MS`,
    /// default 3000). Renewed every third of it; failover takes about this long plus recovery.
    pub lease_ms: u64,
    /// How many shards the wearables are spread over by a hash of their device id
    /// (`SHERS_CLUSTER__DEVICE_SHARDS`, default 16, at most 1024). Every node takes an equal
    /// share of them. All nodes of a cluster must agree on it.
    pub device_shards: u16,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            node_id: None,
            internal_bind: "127.0.0.1:0".to_owned(),
            advertise_url: None,
            lease_ms: 3_000,
            device_shards: 16,
        }
    }
}

/// HTTP server settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Largest accepted JSON body in bytes; larger bodies get 413. The default fits a batch of
    /// 1,000 readings comfortably.
    pub body_limit_bytes: usize,
    /// Number of actix-web worker threads (default: one per physical core).
    pub workers: Option<usize>,
    /// Seconds a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout_s: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            body_limit_bytes: 1024 * 1024,
            workers: None,
            shutdown_timeout_s: 30,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Log settings (levels come from `RUST_LOG`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json` (`SHERS_LOG__FORMAT`).
    pub format: LogFormat,
}

/// Authentication settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Seconds a verified token stays cached in memory. A token revoked through the admin API
    /// stops working at once on this node; one revoked with `shers token revoke` (another
    /// process) stops within this many seconds.
    pub cache_ttl_s: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self { cache_ttl_s: 10 }
    }
}

/// Which raw readings are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// None (status events still carry their evidence).
    None,
    /// Those behind a status change.
    #[default]
    Evidence,
    /// Every accepted reading, written in batches.
    All,
}

/// Triage settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TriageSettings {
    /// TOML file with threshold rules (`SHERS_TRIAGE__RULES_FILE`); the defaults are compiled in.
    /// An invalid file stops start-up.
    pub rules_file: Option<PathBuf>,
    /// Seconds a fall without movement is given before it escalates to an emergency; when set,
    /// overrides the rules file's `fall_grace_s` (default 60).
    pub fall_grace_s: Option<u64>,
    /// Seconds of silence after which a wearable is reported offline.
    pub device_offline_s: u64,
    /// Raw readings kept: `none`, `evidence` (behind a status change) or `all`.
    pub raw_retention: Retention,
    /// Most readings being triaged at once across all requests; beyond it ingest answers 503
    /// with `Retry-After` instead of queueing without bound.
    pub max_in_flight_readings: usize,
}

impl TriageSettings {
    /// The triage rules: the compiled-in defaults, or the rules file (an invalid file is a
    /// start-up error naming the problem), with `fall_grace_s` applied on top when set.
    pub fn rules(&self) -> anyhow::Result<crate::domain::triage::TriageRules> {
        use anyhow::Context as _;
        let mut rules = match &self.rules_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the triage rules file {}", path.display()))?;
                crate::domain::triage::TriageRules::from_toml_str(&text)
                    .with_context(|| format!("invalid triage rules file {}", path.display()))?
            }
            None => crate::domain::triage::TriageRules::default(),
        };
        if let Some(grace) = self.fall_grace_s {
            rules.fall_grace_s = grace;
        }
        Ok(rules)
    }
}

impl Default for TriageSettings {
    fn default() -> Self {
        Self {
            rules_file: None,
            fall_grace_s: None,
            device_offline_s: 300,
            raw_retention: Retention::Evidence,
            max_in_flight_readings: 50_000,
        }
    }
}

/// Dispatch settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Seconds an offer stays open before it expires.
    pub offer_ttl_s: u64,
    /// Units offered the job at once in each round.
    pub offers_per_round: usize,
    /// Rounds before the incident is escalated to the dispatchers.
    pub max_rounds: u32,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            offer_ttl_s: 30,
            offers_per_round: 3,
            max_rounds: 3,
        }
    }
}

/// Routing (ETA) settings (`docs/interop.md` §5).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSettings {
    /// The ETA providers in the order they are asked (`SHERS_ROUTING__PROVIDERS`; default
    /// `["osrm"]`): a TOML array or a comma-separated string (`google,osrm`, one name alone
    /// included). A listed provider that is not configured is skipped (OSRM needs `base_url`);
    /// `google` without `google_api_key` stops start-up. The straight line is always last.
    #[serde(deserialize_with = "provider_list")]
    pub providers: Vec<RoutingProvider>,
    /// OSRM base URL (`SHERS_ROUTING__BASE_URL`); unset skips OSRM in the chain.
    pub base_url: Option<String>,
    /// Milliseconds before an OSRM call is abandoned for the next provider.
    pub timeout_ms: u64,
    /// Google Routes API key (`SHERS_ROUTING__GOOGLE_API_KEY`), sent as `X-Goog-Api-Key`.
    pub google_api_key: Option<Secret<String>>,
    /// Google Routes API base URL (default `https://routes.googleapis.com`; tests point it at a
    /// local fake).
    pub google_base_url: String,
    /// Milliseconds before a Google call is abandoned for the next provider (default 1,000).
    pub google_timeout_ms: u64,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            providers: vec![RoutingProvider::Osrm],
            base_url: None,
            timeout_ms: 300,
            google_api_key: None,
            google_base_url: "https://routes.googleapis.com".to_owned(),
            google_timeout_ms: 1_000,
        }
    }
}

impl RoutingSettings {
    fn check(&self) -> Result<(), String> {
        for (i, p) in self.providers.iter().enumerate() {
            if self.providers[..i].contains(p) {
                return Err(format!("routing.providers lists {} twice", p.as_str()));
            }
        }
        let has_key = self
            .google_api_key
            .as_ref()
            .is_some_and(|k| !k.expose().trim().is_empty());
        if self.providers.contains(&RoutingProvider::Google) && !has_key {
            return Err(
                "routing.providers lists google but routing.google_api_key is not set".to_owned(),
            );
        }
        Ok(())
    }
}

/// A road-ETA provider that `routing.providers` can name.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoutingProvider {
    /// The Google Routes API (`computeRouteMatrix`).
    Google,
    /// An OSRM `table` service at `routing.base_url`.
    Osrm,
}

impl RoutingProvider {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingProvider::Google => "google",
            RoutingProvider::Osrm => "osrm",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "google" => Some(RoutingProvider::Google),
            "osrm" => Some(RoutingProvider::Osrm),
            _ => None,
        }
    }
}

/// Reads `routing.providers` from a list of names or one comma-separated string (environment
/// variables are strings).
fn provider_list<'de, D>(deserializer: D) -> Result<Vec<RoutingProvider>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Names;

    fn one<E: serde::de::Error>(name: &str) -> Result<RoutingProvider, E> {
        RoutingProvider::parse(name.trim()).ok_or_else(|| {
            E::custom(format!(
                "unknown routing provider `{}` (expected google or osrm)",
                name.trim()
            ))
        })
    }

    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Vec<RoutingProvider>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of provider names or a comma-separated string")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.trim().is_empty() {
                return Ok(Vec::new());
            }
            v.split(',').map(one).collect()
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                out.push(one(&name)?);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_any(Names)
}

/// Payment provider kind.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PaymentProvider {
    /// A Stripe-compatible REST API.
    #[default]
    Stripe,
    /// Deterministic demo provider; refused anywhere else.
    Sandbox,
}

/// Payment settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentSettings {
    /// `stripe` or `sandbox` (`SHERS_PAYMENTS__PROVIDER`).
    pub provider: PaymentProvider,
    /// Base URL of the Stripe-compatible API.
    pub base_url: String,
    /// API key for the payment provider.
    pub api_key: Option<Secret<String>>,
    /// ISO 4217 currency code for invoices.
    pub currency: String,
    /// Tariff: base fee, minor units.
    pub base_fee_cents: i64,
    /// Tariff: per km scene → hospital, minor units.
    pub per_km_cents: i64,
    /// Tariff: ALS surcharge, minor units.
    pub als_surcharge_cents: i64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            provider: PaymentProvider::Stripe,
            base_url: "https://api.stripe.com".to_owned(),
            api_key: None,
            currency: "usd".to_owned(),
            base_fee_cents: 50_000,
            per_km_cents: 1_200,
            als_surcharge_cents: 15_000,
        }
    }
}

/// Insurance verification service settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InsuranceSettings {
    /// Base URL billing calls (default: this server's own `/insurance/v1`).
    pub base_url: Option<String>,
    /// Mount the insurance service in-process at `/insurance/v1`.
    pub embedded: bool,
    /// Bearer token (role admin on the insurance service) billing uses. When unset, billing
    /// presents a credential this process makes at start and holds in memory, which only this
    /// process's embedded service accepts (no token is minted).
    pub api_token: Option<Secret<String>>,
}

impl Default for InsuranceSettings {
    fn default() -> Self {
        Self {
            base_url: None,
            embedded: true,
            api_token: None,
        }
    }
}

/// Notification provider settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifySettings {
    /// Twilio-compatible SMS API base URL.
    pub sms_base_url: Option<String>,
    /// SMS account SID.
    pub sms_account_sid: Option<String>,
    /// SMS auth token.
    pub sms_auth_token: Option<Secret<String>>,
    /// SMS sender number.
    pub sms_from: Option<String>,
    /// SMTP URL (`smtp://user:pass@host:port`, `smtps://…`).
    pub smtp_url: Option<Secret<String>>,
    /// Sender of notification emails (default `SHERS <noreply@shers.invalid>`).
    pub email_from: Option<String>,
    /// Seconds an SMS or webhook call may take.
    pub timeout_s: Option<u64>,
    /// Generic webhook receiving signed JSON notifications.
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the webhook signature.
    pub webhook_secret: Option<Secret<String>>,
    /// Amazon SNS region (`eu-west-1`). SNS is on when this and both SNS keys are set.
    pub sns_region: Option<String>,
    /// Amazon SNS access key id (`AKIA…`).
    pub sns_access_key_id: Option<String>,
    /// Amazon SNS secret access key.
    pub sns_secret_access_key: Option<Secret<String>>,
    /// SNS Query API endpoint (default `https://sns.<region>.amazonaws.com`).
    pub sns_base_url: Option<String>,
    /// Publish once per incident and template to this topic (with message attribute
    /// `patient_id`). Unset: SNS sends the `sms` channel's texts to each next-of-kin phone,
    /// and Twilio (`sms_*`) must then be unset.
    pub sns_topic_arn: Option<String>,
}

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] config::ConfigError);

/// Push to crews' phones through Firebase Cloud Messaging HTTP v1: an offer to a unit with no
/// live crew WebSocket is pushed to each of the unit's registered tokens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushSettings {
    /// A Google service account's JSON key file (`client_email`, `private_key`, `token_uri`,
    /// `project_id`). Set: push is on. Unset: off.
    pub fcm_credentials_file: Option<String>,
    /// The Firebase project; default: the credentials file's `project_id`.
    pub fcm_project_id: Option<String>,
    /// FCM's base URL (tests point it at a local fake).
    pub fcm_base_url: String,
    /// Milliseconds one FCM or token call may take.
    pub timeout_ms: u64,
}

impl Default for PushSettings {
    fn default() -> Self {
        Self {
            fcm_credentials_file: None,
            fcm_project_id: None,
            fcm_base_url: "https://fcm.googleapis.com".to_owned(),
            timeout_ms: 5_000,
        }
    }
}

/// Environment variables with the conventional names outside the `SHERS_` prefix.
const CONVENTIONAL_ENV: &[(&str, &str)] =
    &[("DATABASE_URL", "database.url"), ("REDIS_URL", "redis.url")];

/// The fewest readings a device remembers to recognise a repeat (an HTTP client's retry).
const REPEAT_WINDOW_MIN: usize = 8;
/// The MQTT broker's in-flight window SHERS allows for: the shipped Mosquitto recipe's
/// `max_inflight_messages` (deploy/mosquitto/mosquitto.conf; Mosquitto's default is 20).
const MQTT_IN_FLIGHT: usize = 64;

impl Settings {
    /// How many of a device's last stored readings a repeated delivery is recognised among.
    /// A broker redelivers, after a lost connection, every delivery it had handed over and not
    /// seen acknowledged: up to `amqp.prefetch` from RabbitMQ and the broker's in-flight
    /// window from MQTT, all possibly of one device (a gateway's backlog). Readings beyond the
    /// window are applied again as out of order (no status changes) and, with
    /// `raw_retention = "all"`, stored again.
    pub fn repeat_window(&self) -> usize {
        let amqp = if self.amqp.url.is_some() && self.amqp.ingest {
            usize::from(self.amqp.prefetch)
        } else {
            0
        };
        let mqtt = if self.mqtt.url.is_some() {
            MQTT_IN_FLIGHT
        } else {
            0
        };
        (amqp + mqtt).max(REPEAT_WINDOW_MIN)
    }

    /// Loads defaults → `config_file` → the process environment. Flags are applied by the
    /// caller afterwards with [`Settings::with_overrides`].
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(config_file, std::env::vars().collect())
    }

    /// Like [`Settings::load`] with an explicit environment (tests).
    ///
    /// Environment values stay strings until a field asks for a number or a boolean, so an SMS
    /// sender like `+15550001111` or an all-digit secret arrives intact.
    pub fn load_from(
        config_file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = Config::builder();
        if let Some(path) = config_file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let prefixed: HashMap<String, String> = env
            .iter()
            // Test harness variables share the prefix but are not settings.
            .filter(|(k, _)| k.starts_with("SHERS_") && !k.starts_with("SHERS_TEST_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("SHERS")
                .prefix_separator("_")
                .separator("__")
                .source(Some(prefixed)),
        );
        // Conventional names sit at the same level as the prefixed ones (both are
        // environment); they are applied last so the well-known name wins a tie.
        for (var, key) in CONVENTIONAL_ENV {
            if let Some(value) = env.get(*var) {
                builder = builder.set_override(*key, value.clone())?;
            }
        }
        let settings: Self = builder.build()?.try_deserialize()?;
        settings
            .dashboard
            .check()
            .and_then(|()| settings.amqp.check())
            .and_then(|()| settings.mqtt.check())
            .and_then(|()| settings.routing.check())
            .map_err(|m| ConfigError(config::ConfigError::Message(m)))?;
        Ok(settings)
    }

    /// Whether this process runs as a cluster node: Redis configured and PostgreSQL as the
    /// database. SQLite, or no Redis, is one node holding everything.
    pub fn clustered(&self) -> bool {
        let url = self.database.url.expose();
        self.redis.url.is_some()
            && (url.starts_with("postgres://") || url.starts_with("postgresql://"))
    }

    /// Applies command-line overrides (highest precedence).
    pub fn with_overrides(mut self, bind: Option<String>, database_url: Option<String>) -> Self {
        if let Some(bind) = bind {
            self.bind = bind;
        }
        if let Some(url) = database_url {
            self.database.url = Secret::new(url);
        }
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tile_url_is_checked_and_its_origin_feeds_the_csp() {
        let env =
            |url: &str| HashMap::from([("SHERS_DASHBOARD__TILE_URL".to_owned(), url.to_owned())]);
        let ok = Settings::load_from(
            None,
            env("https://tiles.example.org:8443/osm/{z}/{x}/{y}.png"),
        )
        .unwrap();
        assert_eq!(
            ok.dashboard.tile_origin(),
            Some("https://tiles.example.org:8443")
        );
        for bad in [
            "ftp://tiles.example.org/{z}/{x}/{y}.png",
            "https://tiles.example.org/{z}/{x}.png",
            "https:///{z}/{x}/{y}",
            "https://x.org/{z}/{x}/{y}.png; script-src *",
        ] {
            let err = Settings::load_from(None, env(bad)).unwrap_err().to_string();
            assert!(err.contains("dashboard.tile_url"), "{bad}: {err}");
        }
        assert_eq!(Settings::default().dashboard.tile_origin(), None);
    }

    #[test]
    fn routing_providers_parse_from_a_string_a_name_or_an_array() {
        use RoutingProvider::{Google, Osrm};
        let key = ("SHERS_ROUTING__GOOGLE_API_KEY", "AIza-test");
        let providers = |pairs: &[(&str, &str)]| {
            Settings::load_from(None, env(pairs)).map(|s| s.routing.providers)
        };
        assert_eq!(providers(&[]).unwrap(), [Osrm], "default");
        assert_eq!(
            providers(&[("SHERS_ROUTING__PROVIDERS", "google,osrm"), key]).unwrap(),
            [Google, Osrm]
        );
        assert_eq!(
            providers(&[("SHERS_ROUTING__PROVIDERS", " osrm , google "), key]).unwrap(),
            [Osrm, Google]
        );
        assert_eq!(
            providers(&[("SHERS_ROUTING__PROVIDERS", "google"), key]).unwrap(),
            [Google]
        );
        assert_eq!(
            providers(&[("SHERS_ROUTING__PROVIDERS", "")]).unwrap(),
            [],
            "straight line only"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shers.toml");
        std::fs::write(
            &file,
            "[routing]\nproviders = [\"google\", \"osrm\"]\ngoogle_api_key = \"k\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&file), HashMap::new()).unwrap();
        assert_eq!(s.routing.providers, [Google, Osrm]);
        assert_eq!(s.routing.google_base_url, "https://routes.googleapis.com");
        assert_eq!(s.routing.google_timeout_ms, 1_000);
        assert!(!format!("{s:?}").contains("\"k\""), "the key is redacted");

        for (value, needle) in [("google,bing", "bing"), ("osrm,osrm", "twice")] {
            let err = providers(&[("SHERS_ROUTING__PROVIDERS", value), key])
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{value}: {err}");
        }
    }

    #[test]
    fn google_without_a_key_stops_start_up() {
        for pairs in [
            &[("SHERS_ROUTING__PROVIDERS", "google,osrm")][..],
            &[
                ("SHERS_ROUTING__PROVIDERS", "osrm,google"),
                ("SHERS_ROUTING__GOOGLE_API_KEY", " "),
            ][..],
        ] {
            let err = Settings::load_from(None, env(pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains("routing.google_api_key"), "{err}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let mut settings = Settings::default();
        settings.database.url = Secret::new("postgres://user:hunter2@db/shers".into());
        let debug = format!("{settings:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("[REDACTED]"));
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shers.toml");
        std::fs::write(
            &file,
            "bind = \"0.0.0.0:9000\"\n[dispatch]\noffer_ttl_s = 45\nmax_rounds = 5\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("SHERS_DISPATCH__OFFER_TTL_S", "20"),
                ("DATABASE_URL", "postgres://localhost/x"),
                ("SHERS_NOTIFY__SMS_FROM", "+15550001111"),
                ("SHERS_PAYMENTS__API_KEY", "0123456789"),
                ("SHERS_INSURANCE__EMBEDDED", "false"),
                ("SHERS_TEST_DATABASE_URL", "ignored"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.bind, "0.0.0.0:9000");
        assert_eq!(s.dispatch.offer_ttl_s, 20, "env beats file");
        assert_eq!(s.dispatch.max_rounds, 5, "file beats default");
        assert_eq!(s.dispatch.offers_per_round, 3, "default kept");
        assert_eq!(s.database.url.expose(), "postgres://localhost/x");
        assert_eq!(s.notify.sms_from.as_deref(), Some("+15550001111"));
        assert_eq!(
            s.payments.api_key.as_ref().map(|k| k.expose().as_str()),
            Some("0123456789")
        );
        assert!(!s.insurance.embedded);
        let s = s.with_overrides(Some("127.0.0.1:1".into()), None);
        assert_eq!(s.bind, "127.0.0.1:1", "flags beat everything");

        let err = Settings::load_from(None, env(&[("SHERS_DISPATCH__OFFER_TTL", "20")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("offer_ttl"), "{err}");
        let err = Settings::load_from(None, env(&[("SHERS_DISPATCH__OFFER_TTL_S", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("offer_ttl_s"), "{err}");
        std::fs::write(&file, "[databse]\nurl = \"x\"\n").unwrap();
        let err = Settings::load_from(Some(&file), HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("databse"), "{err}");
        assert!(
            Settings::load_from(Some(&dir.path().join("missing.toml")), HashMap::new()).is_err()
        );
    }
}
