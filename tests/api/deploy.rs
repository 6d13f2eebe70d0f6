//! The shipped deployment files agree with the program: every environment variable they set is
//! a setting SHERS reads (or one the platform needs), and NGINX points at the compose nodes.

use std::collections::HashMap;
use std::path::Path;

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
