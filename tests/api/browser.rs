//! The dashboard in a real browser: headless Debian Chromium driven over the W3C WebDriver
//! protocol (chromedriver), with a minimal WebDriver client on reqwest. The browser signs in,
//! the test posts an emergency reading through the API, and the incident must appear on the
//! map and in the list without a reload; an incident description carrying markup must show as
//! text and never run. A screenshot is written to `target/dashboard-screenshot.png`.
//!
//! Needs `chromium` and `chromium-driver` (Debian packages; `.ci/run` installs them). Outside
//! CI the test is skipped, loudly, when they are missing; with `CI=true` that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::helpers::{TestApp, api};

/// The W3C key under which an element reference is returned.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn find_binary(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(path) = std::env::var(env) {
        return Some(PathBuf::from(path));
    }
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A chromedriver process on a free port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(chromedriver: &Path, http: &reqwest::Client) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + crate::helpers::PATIENCE;
        loop {
            let ready = http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if let Some(resp) = ready {
                let status: Value = resp.json().await.unwrap();
                if status["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One browser session.
struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn open(driver: &Driver, chromium: &Path, http: reqwest::Client, profile: &Path) -> Self {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--window-size=1440,1000",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let resp: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"));
        Browser {
            session: format!("{}/session/{id}", driver.url),
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp: Value = req.send().await.unwrap().json().await.unwrap();
        if let Some(err) = resp["value"]["error"].as_str() {
            panic!("WebDriver {path}: {err}: {}", resp["value"]["message"]);
        }
        resp["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn script(&self, body: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": body, "args": args})),
        )
        .await
    }

    /// Polls `body` (a script returning a value) until it returns `true`.
    async fn wait_for(&self, what: &str, body: &str, args: Value) {
        let deadline = Instant::now() + crate::helpers::PATIENCE;
        loop {
            if self.script(body, args.clone()).await == true {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, to: &Path) {
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64_decode(png.as_str().unwrap());
        assert!(bytes.starts_with(b"\x89PNG"), "the screenshot is a PNG");
        std::fs::write(to, bytes).unwrap();
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// Standard base64 (the WebDriver screenshot encoding).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= u32::from(value(*c)) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_decodes_every_padding() {
    assert_eq!(base64_decode("TWFu"), b"Man");
    assert_eq!(base64_decode("TWE="), b"Ma");
    assert_eq!(base64_decode("TQ=="), b"M");
}

#[actix_web::test]
async fn the_dashboard_shows_a_new_emergency_live_and_markup_as_text() {
    let chromium = find_binary(
        "SHERS_TEST_CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let chromedriver = find_binary("SHERS_TEST_CHROMEDRIVER", &["/usr/bin/chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        assert!(!ci(), "CI=true but chromium/chromedriver are not installed");
        eprintln!("SKIPPED: browser test (apt install chromium chromium-driver)");
        return;
    };

    let app = TestApp::spawn(Backend::Sqlite).await;
    // A call sign unlike the id: people read call signs.
    let resp = app
        .create_unit(
            Role::Admin,
            &json!({"id": "B-1", "call_sign": "Bravo 1", "capability": "als",
                    "location": {"lat": 51.515, "lng": -0.125}}),
        )
        .await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    app.register_wearer("browser-patient", "browser-watch")
        .await;
    let admin = app.token(Role::Admin).await;

    let http = reqwest::Client::new();
    let driver = Driver::start(&chromedriver, &http).await;
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::open(&driver, &chromium, http, profile.path()).await;

    // Sign in through the form, as a person would.
    browser.goto(&app.url(api::DASHBOARD)).await;
    browser.type_into("#token", &admin).await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .wait_for(
            "the signed-in dashboard",
            "return !document.getElementById('app').hidden && document.getElementById('conn').textContent === 'live'",
            json!([]),
        )
        .await;
    // The unit is on the map before anything happens.
    browser
        .wait_for(
            "the unit on the map",
            "return [...document.querySelectorAll('#svg polygon title')].some(t => t.textContent.startsWith(arguments[0]))",
            json!(["Bravo 1"]),
        )
        .await;

    // An emergency arrives through the public API while the page stays open.
    let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let resp = app
        .post_vitals(&json!({"device_id": "browser-watch", "timestamp": at,
            "heart_rate_bpm": 165, "spo2_pct": 86, "location": {"lat": 51.51, "lng": -0.13}}))
        .await;
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let (reference, incident_id) =
        crate::helpers::eventually("the emergency opened an incident", || async {
            let page: Value = app
                .list_incidents("status=open", Role::Console)
                .await
                .json()
                .await
                .unwrap();
            let reference = page["items"][0]["reference"].as_str().map(str::to_owned)?;
            let id = page["items"][0]["id"].as_str().map(str::to_owned)?;
            Some((reference, id))
        })
        .await;

    browser
        .wait_for(
            "the incident in the list",
            "return [...document.querySelectorAll('#incidents tr')].some(r => r.cells[0].textContent === arguments[0])",
            json!([reference]),
        )
        .await;
    browser
        .wait_for(
            "the incident on the map",
            "return [...document.querySelectorAll('#svg circle title')].some(t => t.textContent.startsWith(arguments[0]))",
            json!([reference]),
        )
        .await;
    browser
        .wait_for(
            "the event in the live timeline",
            "return [...document.querySelectorAll('#events li')].some(li => li.textContent.includes('incident.created'))",
            json!([]),
        )
        .await;
    // The live events name the incident by its reference and the unit by its call sign.
    browser
        .wait_for(
            "the offer in the live timeline, by reference and call sign",
            "return [...document.querySelectorAll('#events li')].some(li => li.textContent.includes('dispatch.offered') && li.textContent.includes(arguments[0]) && li.textContent.includes('Bravo 1'))",
            json!([reference]),
        )
        .await;
    let timeline = browser
        .script(
            "return [...document.querySelectorAll('#events li')].map(li => li.textContent)",
            json!([]),
        )
        .await;
    let raw_tail = &incident_id[incident_id.len() - 6..];
    for line in timeline.as_array().unwrap() {
        let line = line.as_str().unwrap();
        assert!(
            !line.contains(raw_tail) && !line.contains(" B-1"),
            "a raw id in the live events: {line}"
        );
        if line.contains("incident.created") {
            assert!(line.contains(&reference), "{line}");
        }
    }

    // A console-created incident whose description is markup: shown as text, never run.
    let xss = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>";
    let created: Value = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 51.52, "lng": -0.11}, "priority": "urgent", "description": xss}),
        )
        .await
        .json()
        .await
        .unwrap();
    let xss_ref = created["reference"].as_str().unwrap().to_owned();
    browser
        .wait_for(
            "the second incident in the list",
            "return [...document.querySelectorAll('#incidents tr')].some(r => r.cells[0].textContent === arguments[0])",
            json!([xss_ref]),
        )
        .await;
    browser
        .script(
            "const row = [...document.querySelectorAll('#incidents tr')].find(r => r.cells[0].textContent === arguments[0]); row.click(); return true;",
            json!([xss_ref]),
        )
        .await;
    browser
        .wait_for(
            "the description shown as text",
            "return [...document.querySelectorAll('#detail dd')].some(d => d.textContent === arguments[0])",
            json!([xss]),
        )
        .await;
    let pwned = browser
        .script(
            "return [window.__pwned === undefined, document.querySelectorAll('#detail img, #detail script').length]",
            json!([]),
        )
        .await;
    assert_eq!(pwned, json!([true, 0]), "markup in data must never run");

    // The admin's actor inspector lists the live incident actors and shows one's state.
    browser
        .wait_for(
            "the actor inspector",
            "return !document.getElementById('inspector').hidden && [...document.querySelectorAll('#actors tr')].some(r => r.cells[0].textContent === 'incident')",
            json!([]),
        )
        .await;
    browser
        .script(
            "const row = [...document.querySelectorAll('#actors tr')].find(r => r.cells[0].textContent === 'incident'); row.click(); return true;",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "an incident actor's live state",
            "return document.getElementById('actor-state').textContent.includes('\"kind\": \"incident\"')",
            json!([]),
        )
        .await;

    // Keep the picture for people: select the emergency so the detail pane is filled.
    browser
        .script(
            "const row = [...document.querySelectorAll('#incidents tr')].find(r => r.cells[0].textContent === arguments[0]); row.click(); return true;",
            json!([reference]),
        )
        .await;
    browser
        .wait_for(
            "the emergency's detail",
            "return document.querySelector('#detail h2') !== null && document.querySelector('#detail h2').textContent.startsWith(arguments[0])",
            json!([reference]),
        )
        .await;
    // Each offer shows its ETA and who gave it (no router here: the straight line).
    browser
        .wait_for(
            "the offer's ETA source",
            "return [...document.querySelectorAll('#detail dd')].some(d => d.textContent.startsWith('Bravo 1: ') && d.textContent.includes('(straight line)'))",
            json!([]),
        )
        .await;
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshot.png");
    // `target/` is absent when the build went to another CARGO_TARGET_DIR.
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    browser.screenshot(&shot).await;
    eprintln!("dashboard screenshot: {}", shot.display());
    browser.close().await;
}
