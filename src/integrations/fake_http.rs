//! A local HTTP server for the adapters' tests: the fake Twilio and webhook receiver
//! ([`super::notify`]), the fake Stripe ([`super::payments`]) and the fake OSRM
//! ([`super::routing`]) each bring their state and routes; this module owns the server.
//!
//! [`FakeHttp::serve`] starts an actix-web server with one worker on a free loopback port,
//! with the fake's state as `web::Data<S>` and the routes the caller configures. The fake's
//! base URL is [`FakeHttp::url`]; its state stays readable through [`FakeHttp::state`]. The
//! server stops on [`FakeHttp::stop`] or, if a test panics first, when the value is dropped.

#![allow(clippy::unwrap_used)]

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpServer, web};

/// A running fake HTTP server holding state `S`.
pub(crate) struct FakeHttp<S: 'static> {
    /// `http://127.0.0.1:{port}`, without a trailing slash.
    pub(crate) url: String,
    /// The state the handlers see as `web::Data<S>`.
    pub(crate) state: web::Data<S>,
    handle: ServerHandle,
}

impl<S: Send + Sync + 'static> FakeHttp<S> {
    /// Starts the server on `127.0.0.1:0` with `state` and the routes `routes` adds (the
    /// closure runs once per worker, on a clone). Call it inside an actix runtime
    /// (`#[actix_web::test]`): the server runs as a task of that runtime.
    ///
    /// It also installs the rustls crypto provider, since the adapters under test build
    /// reqwest clients without one.
    pub(crate) fn serve<F>(state: S, routes: F) -> Self
    where
        F: FnOnce(&mut web::ServiceConfig) + Clone + Send + 'static,
    {
        install_crypto();
        let state = web::Data::new(state);
        let data = state.clone();
        let server =
            HttpServer::new(move || App::new().app_data(data.clone()).configure(routes.clone()))
                .workers(1)
                .disable_signals()
                .shutdown_timeout(0)
                .bind(("127.0.0.1", 0))
                .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Self {
            url: format!("http://{addr}"),
            state,
            handle,
        }
    }
}

impl<S: 'static> FakeHttp<S> {
    /// Stops the server and waits until it has stopped.
    pub(crate) async fn stop(self) {
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

/// Installs ring as the process's rustls provider (the adapters use `rustls-no-provider`);
/// a second call is a no-op.
pub(crate) fn install_crypto() {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
}

/// A request header as text, `None` if absent or not visible ASCII.
pub(crate) fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A loopback port nothing listens on (bound, then released), for connection-refused tests.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

    fn counting() -> FakeHttp<AtomicUsize> {
        FakeHttp::serve(AtomicUsize::new(0), |cfg| {
            cfg.route("/hit", web::get().to(hit));
        })
    }

    async fn get(client: &reqwest::Client, url: &str) -> reqwest::Result<String> {
        client.get(url).send().await?.text().await
    }

    /// Connection refused, soon after the server was told to stop (within a minute, however
    /// busy the machine).
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
        let url = format!("{}/hit", fake.url);
        assert_eq!(get(&client, &url).await.unwrap(), "0");
        assert_eq!(get(&client, &url).await.unwrap(), "1");
        assert_eq!(fake.state.load(Ordering::SeqCst), 2);
        fake.stop().await;
        assert!(refuses(&url).await);
    }

    #[actix_web::test]
    async fn a_dropped_fake_stops_its_server() {
        let fake = counting();
        let url = format!("{}/hit", fake.url);
        assert_eq!(get(&reqwest::Client::new(), &url).await.unwrap(), "0");
        drop(fake);
        assert!(refuses(&url).await);
    }
}
