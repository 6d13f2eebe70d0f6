//! `amqps://` and `mqtts://`: SHERS reaches brokers on other hosts over TLS on rustls. Each
//! test makes a private CA and a server certificate for `localhost` (openssl), starts a private
//! broker that listens on TLS only, and checks that SHERS connects and ingests with the CA in
//! `amqp.ca_file` / `mqtt.ca_file`, and does not connect without it (the certificate is
//! verified, not merely accepted).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use shers::config::Secret;
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::helpers::{TestApp, api, eventually};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The path of an installed program, also in sbin directories a user's PATH may lack.
fn program(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        ["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

/// Every program the test needs, or `None` (skipped; a failure in CI).
fn programs(names: &[&str]) -> Option<Vec<PathBuf>> {
    let found: Vec<Option<PathBuf>> = names.iter().map(|n| program(n)).collect();
    if found.iter().all(Option::is_some) {
        return Some(found.into_iter().flatten().collect());
    }
    assert!(!ci(), "CI=true and one of {names:?} is not installed");
    eprintln!("SKIPPED: TLS broker test, one of {names:?} is not installed");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory the brokers (which drop to their own users) can read and write, removed on drop.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shers-tls-")
            .tempdir()
            .unwrap();
        set_mode(dir.path(), 0o777);
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        set_mode(&path, 0o644);
        path
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A CA and a server certificate for `localhost` / 127.0.0.1 signed by it, in `dir`:
/// `ca.pem`, `server.pem`, `server.key`.
fn certificates(openssl: &Path, dir: &Dir) {
    let run = |args: &[&str]| {
        let out = Command::new(openssl)
            .args(args)
            .current_dir(dir.0.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=SHERS test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    dir.write(
        "server.ext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    );
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    for f in ["ca.pem", "server.pem", "server.key"] {
        set_mode(&dir.path(f), 0o644);
    }
}

/// Waits until something accepts connections on `port`.
async fn listening(port: u16, what: &str) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `/readyz` says of `bus`.
async fn link(app: &TestApp, bus: &str) -> Value {
    let body: Value = app.get(api::READYZ, None).await.json().await.unwrap();
    body[bus].clone()
}

/// Creates a patient with no device: a message's device is bound to it on first sight.
async fn patient(app: &TestApp, id: &str) {
    let resp = app
        .create_patient(
            Role::Admin,
            &json!({"id": id, "name": "TLS Patient", "home_location": {"lat": 51.5, "lng": -0.12},
                    "next_of_kin": [{"name": "Kin", "phone": "+447700900123"}]}),
        )
        .await;
    assert_eq!(resp.status(), 201);
}

/// Waits until `device` is registered with a stored status (the readings sent are emergencies,
/// so a status change is stored).
async fn applied(app: &TestApp, device: &str) {
    eventually("the reading applied", || async {
        let mut conn = app.db.conn().await.ok()?;
        let state = shers::persistence::patients::find_device(&mut conn, &device.into())
            .await
            .ok()??;
        state.last_status.map(|_| ())
    })
    .await;
}

/// Stops a private RabbitMQ node on drop.
struct Rabbit {
    ctl: PathBuf,
    node: String,
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let _ = Command::new(&self.ctl)
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[actix_web::test]
async fn amqps_verifies_the_broker_against_the_configured_ca() {
    crate::helpers::init();
    let Some(bins) = programs(&["openssl", "rabbitmq-server", "rabbitmqctl"]) else {
        return;
    };
    let dir = Dir::new();
    certificates(&bins[0], &dir);
    let port = free_port();
    let conf = dir.write(
        "rabbitmq.conf",
        &format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            ca = dir.path("ca.pem").display(),
            cert = dir.path("server.pem").display(),
            key = dir.path("server.key").display(),
        ),
    );
    let node = format!("shers-tls-{}@localhost", std::process::id());
    let status = Command::new(&bins[1])
        .arg("-detached")
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_CONFIG_FILE", &conf)
        .env(
            "RABBITMQ_DIST_PORT",
            (u32::from(port) + 20000).min(65000).to_string(),
        )
        .env("RABBITMQ_MNESIA_BASE", dir.path("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.path("log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "rabbitmq-server -detached failed");
    let _rabbit = Rabbit {
        ctl: bins[2].clone(),
        node,
    };
    listening(port, "the TLS RabbitMQ").await;

    let url = format!("amqps://guest:guest@localhost:{port}/%2f");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("t.tls.{suffix}");
    let configure = |s: &mut shers::config::Settings, ca: Option<PathBuf>| {
        s.amqp.url = Some(Secret::new(url.clone()));
        s.amqp.exchange = exchange.clone();
        s.amqp.queue_prefix = format!("t.tls.{suffix}");
        s.amqp.publish = false;
        s.amqp.ca_file = ca;
    };

    // Without the CA the broker's certificate is not trusted: never connected.
    let untrusting = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| configure(s, None))
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(link(&untrusting, "amqp").await, "connecting");
    drop(untrusting);

    let app = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| configure(s, Some(dir.path("ca.pem"))))
        .start()
        .await;
    eventually("SHERS connected over TLS", || async {
        (link(&app, "amqp").await == "connected").then_some(())
    })
    .await;
    patient(&app, "tls-p1").await;

    // A wearable publishes over TLS too.
    let publisher = Connection::connect_with_config(
        &url,
        ConnectionProperties::default(),
        lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(dir.path("ca.pem")).unwrap()),
        },
        lapin::runtime::default_runtime().unwrap(),
    )
    .await
    .unwrap();
    let channel = publisher.create_channel().await.unwrap();
    let body = json!({
        "patient_id": "tls-p1", "device": {"id": "tls-w1", "model": "HealthTracker v1"},
        "location": {"lat": 51.5, "lng": -0.12}, "schemaVersion": "1.0",
        "timestamp": chrono::Utc::now().timestamp_millis(),
        "metrics": {"heartRateBpm": 172, "spO2Percentage": 86.0, "respirationRateBpm": 28,
                    "bodyTemperatureCelsius": 36.8, "stepsSinceLastReading": 0}
    });
    channel
        .basic_publish(
            exchange.as_str().into(),
            "wearable.data".into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    applied(&app, "tls-w1").await;
    let _ = publisher.close(200, "done".into()).await;
}

/// Kills a private mosquitto on drop.
struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[actix_web::test]
async fn mqtts_verifies_the_broker_against_the_configured_ca() {
    crate::helpers::init();
    let Some(bins) = programs(&["openssl", "mosquitto"]) else {
        return;
    };
    let dir = Dir::new();
    certificates(&bins[0], &dir);
    let port = free_port();
    let conf = dir.write(
        "mosquitto.conf",
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             cafile {}\ncertfile {}\nkeyfile {}\n",
            dir.path("ca.pem").display(),
            dir.path("server.pem").display(),
            dir.path("server.key").display(),
        ),
    );
    let _broker = Mosquitto(
        Command::new(&bins[1])
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    listening(port, "the TLS Mosquitto").await;

    let prefix = format!("t/tls/{}", uuid::Uuid::new_v4().simple());
    let url = format!("mqtts://localhost:{port}");
    let configure = |s: &mut shers::config::Settings, ca: Option<PathBuf>, id: &str| {
        s.mqtt.url = Some(Secret::new(url.clone()));
        s.mqtt.topic_prefix = prefix.clone();
        s.mqtt.client_id = Some(format!("shers-tls-{id}-{}", std::process::id()));
        s.mqtt.ca_file = ca;
    };

    let untrusting = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| configure(s, None, "untrusting"))
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(link(&untrusting, "mqtt").await, "connecting");
    drop(untrusting);

    let app = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| configure(s, Some(dir.path("ca.pem")), "trusting"))
        .start()
        .await;
    eventually("SHERS connected over TLS", || async {
        (link(&app, "mqtt").await == "connected").then_some(())
    })
    .await;
    app.register_wearer("tls-p1", "tls-w1").await;

    // A device publishes over TLS, trusting the same CA.
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(dir.path("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut options = rumqttc::MqttOptions::new(
        format!("tls-device-{}", std::process::id()),
        "localhost",
        port,
    );
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let reading = json!({"device_id": "tls-w1", "timestamp": chrono::Utc::now().to_rfc3339(),
                         "heart_rate_bpm": 172, "spo2_pct": 86, "respiration_rate_bpm": 28,
                         "body_temp_c": 36.8});
    client
        .publish(
            format!("{prefix}/tls-w1/vitals"),
            rumqttc::QoS::AtLeastOnce,
            false,
            reading.to_string(),
        )
        .await
        .unwrap();
    applied(&app, "tls-w1").await;
    pump.abort();
}
