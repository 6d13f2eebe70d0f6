//! The shipped deployment files agree with the program: every environment variable they set is
//! a setting SHERS reads (or one the platform needs), and NGINX points at the compose nodes.
//! The shipped NGINX config, run for real, answers a client whose node died with SHERS'
//! problem+json 503 and `Retry-After` rather than its own HTML 502 (needs `nginx`, which
//! `.ci/run` installs; outside CI the test is skipped, loudly, without it). Log lines written
//! to a file or pipe, as a node's are under a supervisor, carry no terminal colour codes.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;
use shers::config::Settings;

/// Variables set for something other than SHERS' settings, and why.
const NOT_SETTINGS: &[(&str, &str)] = &[
    ("RUST_LOG", "the log filter, read by tracing-subscriber"),
    ("MIMALLOC_PURGE_DELAY", "read by the allocator"),
    ("POD_NAME", "referenced as $(POD_NAME) by the node id"),
    (
        "POD_IP",
        "referenced as $(POD_IP) by the advertised address",
    ),
];

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value.apply_merge().unwrap();
            value
        })
        .collect()
}

use serde::Deserialize as _;

/// Checks one container's or service's variables; `what` names it in failures.
fn check_env(what: &str, env: &[(String, Option<String>)]) {
    let defined: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for (name, value) in env {
        if NOT_SETTINGS.iter().any(|(n, _)| n == name) {
            continue;
        }
        assert!(
            name.starts_with("SHERS_") || name == "DATABASE_URL" || name == "REDIS_URL",
            "{what}: {name} is not a SHERS setting"
        );
        // Values from secrets are not in the file: any well-formed URL stands in for them.
        let value = value.clone().unwrap_or_else(|| match name.as_str() {
            "REDIS_URL" => "redis://redis:6379/".to_owned(),
            _ => "postgres://u@h/db".to_owned(),
        });
        for reference in value.split("$(").skip(1) {
            let referenced = reference.split(')').next().unwrap();
            assert!(
                defined.contains(&referenced),
                "{what}: {name} refers to $({referenced}), which is not defined"
            );
        }
        let loaded = Settings::load_from(None, HashMap::from([(name.clone(), value.clone())]));
        assert!(
            loaded.is_ok(),
            "{what}: {name}={value} is refused by the configuration: {}",
            loaded.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
}

#[test]
fn every_manifest_sets_only_settings_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_documents(&path) {
            let containers = doc["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .cloned()
                .unwrap_or_default();
            for container in containers {
                let env: Vec<(String, Option<String>)> = container["env"]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|e| {
                        (
                            e["name"].as_str().unwrap().to_owned(),
                            e["value"].as_str().map(str::to_owned),
                        )
                    })
                    .collect();
                check_env(&format!("{}", path.display()), &env);
                checked += env.len();
            }
        }
    }
    let compose = yaml_documents(&root.join("docker-compose.yml")).remove(0);
    let services = compose["services"].as_mapping().unwrap();
    let mut nodes = Vec::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let Some(environment) = service["environment"].as_mapping() else {
            continue;
        };
        if name.starts_with("shers") {
            nodes.push(name.to_owned());
        } else {
            continue;
        }
        let env: Vec<(String, Option<String>)> = environment
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().unwrap().to_owned(), Some(value))
            })
            .collect();
        check_env(&format!("docker-compose.yml service {name}"), &env);
        checked += env.len();
    }
    assert!(
        checked > 20,
        "only {checked} variables found: is the parsing right?"
    );
    assert_eq!(nodes.len(), 3, "compose runs three nodes: {nodes:?}");

    // NGINX spreads clients over exactly those nodes.
    let nginx = std::fs::read_to_string(root.join("deploy/nginx/shers.conf")).unwrap();
    for node in &nodes {
        assert!(
            nginx.contains(&format!("server {node}:8080")),
            "deploy/nginx/shers.conf does not list {node}"
        );
    }
}

#[test]
fn the_kubernetes_cluster_is_sized_and_timed_for_handovers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deployment = yaml_documents(&root.join("deploy/k8s/deployment.yaml")).remove(0);
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let pod = &deployment["spec"]["template"]["spec"];
    let defaults = Settings::default();
    let handover_s = defaults.http.shutdown_timeout_s + 5;
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > handover_s,
        "the grace period must outlast preStop plus the drain"
    );
    let pdb = yaml_documents(&root.join("deploy/k8s/pdb.yaml")).remove(0);
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(2));
    let argo = yaml_documents(&root.join("deploy/argocd/application.yaml")).remove(0);
    assert_eq!(argo["kind"], "Application");
    assert_eq!(argo["spec"]["source"]["path"], "deploy/k8s");
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// NGINX running `deploy/nginx/shers.conf` on loopback, as `scripts/cluster.sh` runs it, with
/// the upstream pointed at `nodes`, in one process (no master and workers: killing it on drop
/// leaves nothing behind).
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    fn start(nginx: &Path, nodes: [u16; 3]) -> Nginx {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let shipped = std::fs::read_to_string(root.join("deploy/nginx/shers.conf")).unwrap();
        let mut conf = shipped
            .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
            .replace(
                "/var/log/nginx/shers.access.log",
                &dir.path().join("access.log").display().to_string(),
            );
        for (i, node) in nodes.iter().enumerate() {
            let shipped_node = format!("server shers-{}:8080", i + 1);
            assert!(
                conf.contains(&shipped_node),
                "shers.conf lost {shipped_node}"
            );
            conf = conf.replace(&shipped_node, &format!("server 127.0.0.1:{node}"));
        }
        let d = dir.path().display();
        std::fs::write(dir.path().join("shers.conf"), conf).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "master_process off;\npid {d}/nginx.pid;\nevents {{ worker_connections 64; }}\n\
                 http {{\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n\
                 scgi_temp_path {d}/scgi;\n include {d}/shers.conf;\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nginx");
        let mut nginx = Nginx { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = nginx.child.stderr.take() {
                    pipe.read_to_string(&mut stderr).unwrap();
                }
                let log =
                    std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}) with the shipped config: {stderr}{log}");
            }
            assert!(Instant::now() < deadline, "nginx did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }
}

/// A node that dies with a request in flight: it takes the connection, reads the request and
/// goes away without an answer (what NGINX sees when a node is killed mid-request).
fn dying_node() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            drop(stream);
        }
    });
    port
}

#[actix_web::test]
async fn nginx_answers_problem_json_503_with_retry_after_when_no_node_can() {
    crate::helpers::init();
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        assert!(
            !ci(),
            "CI=true but nginx is not installed (apt-get install nginx-light)"
        );
        eprintln!("SKIPPED: nginx is not installed (apt-get install nginx-light)");
        return;
    };
    // One node dies mid-request; the other two are not running at all (connection refused).
    let proxy = Nginx::start(&nginx, [dying_node(), free_port(), free_port()]);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", proxy.port);
    for request in [
        // A POST is never sent to a second node (it may have been acted on): the client is told.
        http.post(format!("{base}/api/v1/incidents"))
            .header("content-type", "application/json")
            .header("idempotency-key", "deploy-test")
            .body(r#"{"patient_id":"p-1","description":"collapsed"}"#),
        // A GET tries every node, and none answers.
        http.get(format!("{base}/readyz")),
    ] {
        let response = request.send().await.unwrap();
        let what = format!("{} {}", response.url().path(), response.status());
        assert_eq!(response.status().as_u16(), 503, "{what}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        let retry_after: u32 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1, "{what}: Retry-After {retry_after}");
        let problem: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(problem["status"].as_u64(), Some(503), "{what}");
        assert_eq!(
            problem["type"].as_str(),
            Some(format!("{}unavailable", shers::http::error::PROBLEM_BASE).as_str()),
            "{what}"
        );
        assert!(problem["title"].is_string() && problem["detail"].is_string());
    }
}

#[test]
fn log_lines_written_to_a_file_or_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shers.db", dir.path().display());
    let out = Command::new(env!("CARGO_BIN_EXE_shers"))
        .args(["--database-url", &url, "token", "create", "--role", "admin"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("SHERS_LOG__FORMAT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "token create failed: {stderr}");
    // A fresh database: the migrations are applied and logged at info.
    assert!(
        stderr.contains("migrations applied"),
        "no log line to check: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "terminal escape codes in log lines written to a pipe: {stderr:?}"
    );
}
