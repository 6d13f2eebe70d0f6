//! [`FakeHttp`]: the server, its journal and its held answers.

use std::sync::{Arc, Mutex};

use actix_web::body::BoxBody;
use actix_web::dev::{Payload, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::web::{self, BytesMut};
use actix_web::{App, Error, HttpMessage as _, HttpServer};
use futures_util::StreamExt as _;
use tokio::sync::watch;

use crate::{Nth, Recorded, install_crypto};

/// A running fake of an outside HTTP service holding state `S` (see the [crate] docs).
///
/// ```no_run
/// # async fn demo() {
/// use actix_web::{HttpResponse, web};
/// use shers_test_support::{FakeHttp, Nth};
///
/// // A Twilio whose first answer is a 429.
/// async fn messages(Nth(n): Nth) -> HttpResponse {
///     if n == 0 {
///         return HttpResponse::TooManyRequests().finish();
///     }
///     HttpResponse::Created().body(r#"{"sid": "SM1"}"#)
/// }
/// let twilio = FakeHttp::start((), |cfg| {
///     cfg.route("/2010-04-01/Accounts/{sid}/Messages.json", web::post().to(messages));
/// });
/// // … point the client at `twilio.url()`, send …
/// assert_eq!(twilio.count(), 2);
/// assert!(twilio.requests()[1].header("authorization").is_some());
/// # }
/// ```
pub struct FakeHttp<S: 'static = ()> {
    port: u16,
    url: String,
    state: web::Data<S>,
    shared: Arc<Shared>,
    handle: ServerHandle,
}

/// What the server's worker and the test share.
struct Shared {
    /// Every request in arrival order, and how many of the next answers to hold.
    inner: Mutex<Journal>,
    /// Bumped by [`FakeHttp::release`]: an answer held in generation `g` goes out once the
    /// value is past `g`.
    released: watch::Sender<u64>,
}

struct Journal {
    requests: Vec<Recorded>,
    holds: usize,
}

impl Shared {
    /// Notes a request; returns its position and, if its answer is to be held, the
    /// generation it waits out.
    fn arrive(&self, request: Recorded) -> (Nth, Option<u64>) {
        let mut journal = self.inner.lock().unwrap();
        journal.requests.push(request);
        let nth = Nth(journal.requests.len() - 1);
        if journal.holds == 0 {
            return (nth, None);
        }
        journal.holds -= 1;
        (nth, Some(*self.released.borrow()))
    }

    /// Returns once the answers of `generation` are released, or never if the fake ends
    /// first (the server then drops the waiting request).
    async fn held(&self, generation: u64) {
        let mut released = self.released.subscribe();
        // An error means the fake is gone: nobody is waiting for the answer any more.
        let _ = released.wait_for(|g| *g > generation).await;
    }
}

/// Records the request (draining the body and putting it back for the handler), runs the
/// handler, then holds the answer if it was asked to.
async fn record(
    shared: Arc<Shared>,
    mut req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let mut payload = req.take_payload();
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        body.extend_from_slice(&chunk?);
    }
    let body = body.freeze();
    req.set_payload(Payload::from(body.clone()));
    let (nth, hold) = shared.arrive(Recorded {
        method: req.method().clone(),
        path: req.path().to_owned(),
        query: req.query_string().to_owned(),
        headers: req.headers().clone(),
        body,
    });
    req.extensions_mut().insert(nth);
    let response = next.call(req).await?;
    if let Some(generation) = hold {
        shared.held(generation).await;
    }
    Ok(response)
}

impl<S: Send + Sync + 'static> FakeHttp<S> {
    /// Starts the fake on `127.0.0.1:0` with `state` and the routes `routes` adds (the closure
    /// runs once per worker, on a clone; there is one worker). Call it inside an actix runtime
    /// (`#[actix_web::test]`): the server runs as a task of it.
    ///
    /// It also installs the rustls crypto provider ([`install_crypto`]), which SHERS' clients
    /// need and do not install themselves.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub fn start<F>(state: S, routes: F) -> Self
    where
        F: FnOnce(&mut web::ServiceConfig) + Clone + Send + 'static,
    {
        install_crypto();
        let state = web::Data::new(state);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Journal {
                requests: Vec::new(),
                holds: 0,
            }),
            released: watch::Sender::new(0),
        });
        let (data, journal) = (state.clone(), shared.clone());
        let server = HttpServer::new(move || {
            let journal = journal.clone();
            App::new()
                .app_data(data.clone())
                .wrap(from_fn(move |req, next| record(journal.clone(), req, next)))
                .configure(routes.clone())
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .bind(("127.0.0.1", 0))
        .unwrap();
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Self {
            port,
            url: format!("http://127.0.0.1:{port}"),
            state,
            shared,
            handle,
        }
    }
}

impl<S: 'static> FakeHttp<S> {
    /// The port the fake listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:{port}`, without a trailing slash: the base URL to configure.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The state the handlers see as `web::Data<S>`.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Every request so far, in arrival order (each one recorded before its handler ran).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.inner.lock().unwrap().requests.clone()
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.shared.inner.lock().unwrap().requests.len()
    }

    /// How many requests so far `matches` accepts.
    pub fn count_where(&self, matches: impl Fn(&Recorded) -> bool) -> usize {
        let journal = self.shared.inner.lock().unwrap();
        journal.requests.iter().filter(|r| matches(r)).count()
    }

    /// Holds the answers to the next `answers` requests: their handlers run at once (a charge
    /// is made, a message queued), but the answer leaves only on [`release`](Self::release);
    /// if that never comes, the client never hears back (its own timeout ends the call). It
    /// replaces what was still to be held.
    pub fn hold(&self, answers: usize) {
        self.shared.inner.lock().unwrap().holds = answers;
    }

    /// Sends every held answer now and holds no more.
    pub fn release(&self) {
        self.shared.inner.lock().unwrap().holds = 0;
        self.shared.released.send_modify(|g| *g += 1);
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

impl<S: 'static> Drop for FakeHttp<S> {
    fn drop(&mut self) {
        // `stop` sends the command at once; the future it returns only waits for the server
        // to finish, which a synchronous drop cannot do. After `stop()` this is a no-op.
        drop(self.handle.stop(false));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use actix_web::HttpResponse;

    use super::*;

    async fn hit(counter: web::Data<AtomicUsize>) -> HttpResponse {
        HttpResponse::Ok().body(counter.fetch_add(1, Ordering::SeqCst).to_string())
    }

    /// Answers with the request's position and echoes its body.
    async fn echo(Nth(n): Nth, body: web::Bytes) -> HttpResponse {
        HttpResponse::Ok().body(format!("{n}:{}", String::from_utf8_lossy(&body)))
    }

    fn counting() -> FakeHttp<AtomicUsize> {
        FakeHttp::start(AtomicUsize::new(0), |cfg| {
            cfg.route("/hit", web::get().to(hit))
                .route("/echo", web::post().to(echo));
        })
    }

    async fn get(client: &reqwest::Client, url: &str) -> reqwest::Result<String> {
        client.get(url).send().await?.text().await
    }

    async fn post(client: &reqwest::Client, url: &str, body: &'static str) -> String {
        let resp = client.post(url).body(body).send().await.unwrap();
        resp.text().await.unwrap()
    }

    /// Connection refused, soon after the server was told to stop (within a minute, however
    /// busy the machine). Real sockets: this cannot run on paused time.
    async fn refuses(url: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            // A fresh client each time: no pooled keep-alive connection to the old worker.
            if reqwest::Client::new().get(url).send().await.is_err() {
                return true;
            }
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[actix_web::test]
    async fn serves_routes_with_shared_state_until_stopped() {
        let fake = counting();
        let client = reqwest::Client::new();
        let url = format!("{}/hit", fake.url());
        assert_eq!(url, format!("http://127.0.0.1:{}/hit", fake.port()));
        assert_eq!(get(&client, &url).await.unwrap(), "0");
        assert_eq!(get(&client, &url).await.unwrap(), "1");
        assert_eq!(fake.state().load(Ordering::SeqCst), 2);
        fake.stop().await;
        assert!(refuses(&url).await);
    }

    #[actix_web::test]
    async fn a_dropped_fake_stops_its_server() {
        let fake = counting();
        let url = format!("{}/hit", fake.url());
        assert_eq!(get(&reqwest::Client::new(), &url).await.unwrap(), "0");
        drop(fake);
        assert!(refuses(&url).await);
    }

    #[actix_web::test]
    async fn every_request_is_recorded_and_numbered_and_its_body_still_reaches_the_handler() {
        let fake = counting();
        let client = reqwest::Client::new();
        let echo = format!("{}/echo?x=1", fake.url());
        assert_eq!(
            get(&client, &format!("{}/hit", fake.url())).await.unwrap(),
            "0"
        );
        assert_eq!(post(&client, &echo, "a=1&b=%2B2").await, "1:a=1&b=%2B2");
        // A route the fake does not have is answered 404 and recorded all the same.
        let missing = client
            .delete(format!("{}/nowhere", fake.url()))
            .header("x-key", "k1")
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);

        assert_eq!(fake.count(), 3);
        let seen = fake.requests();
        assert_eq!(
            (seen[0].method.as_str(), seen[0].path_and_query().as_str()),
            ("GET", "/hit")
        );
        assert_eq!(seen[0].body.len(), 0);
        assert_eq!(seen[1].method, "POST");
        assert_eq!(seen[1].path, "/echo");
        assert_eq!(seen[1].query, "x=1");
        assert_eq!(seen[1].text(), "a=1&b=%2B2");
        assert_eq!(seen[1].form()["b"], "+2");
        assert_eq!(seen[2].header("x-key"), Some("k1"));
        assert_eq!(fake.count_where(|r| r.method == "POST"), 1);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn held_answers_wait_for_the_release_and_others_do_not() {
        let fake = counting();
        let client = reqwest::Client::new();
        let url = format!("{}/echo", fake.url());
        fake.hold(1);
        let held = actix_web::rt::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move { post(&client, &url, "first").await }
        });
        // The handler ran (its request is recorded) but its answer is kept back: the next
        // request overtakes it.
        while fake.count() == 0 {
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(post(&client, &url, "second").await, "1:second");
        assert!(!held.is_finished());
        fake.release();
        assert_eq!(held.await.unwrap(), "0:first");
        fake.stop().await;
    }

    #[actix_web::test]
    async fn an_answer_held_for_ever_ends_in_the_clients_timeout() {
        let fake = counting();
        fake.hold(usize::MAX);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let e = client
            .post(format!("{}/echo", fake.url()))
            .send()
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert_eq!(fake.count(), 1);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn nth_outside_a_fake_is_an_error() {
        let req = actix_web::test::TestRequest::default().to_http_request();
        let answer = <Nth as actix_web::FromRequest>::extract(&req).await;
        assert!(answer.is_err());
    }
}
