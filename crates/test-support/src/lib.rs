//! Test support for SHERS: [`FakeHttp`], the one local fake of an outside HTTP service (OSRM,
//! Stripe, an insurer, Twilio, a webhook receiver) that the adapters' unit tests
//! (`src/integrations/`) and the API tests (`tests/api/`) both start. It must never reach the
//! shipped binary, and it holds no SHERS type: a fake is the outside world, so it knows HTTP
//! only.
//!
//! # What a fake offers
//!
//! - **Routes and state.** [`FakeHttp::start`] serves the routes a test configures, with the
//!   test's state as `web::Data<S>`, on a free loopback port ([`FakeHttp::url`],
//!   [`FakeHttp::port`]); the test reads the state through [`FakeHttp::state`].
//! - **A journal.** Every request is recorded, method, path, query, headers and raw body, before
//!   its handler runs ([`FakeHttp::requests`], [`FakeHttp::count`], [`FakeHttp::count_where`]),
//!   so a fake's handlers only decide what to answer.
//! - **Scripted answers.** A handler that takes [`Nth`] knows the request's position in the
//!   journal ("the first two calls get a 503").
//! - **Held answers.** [`FakeHttp::hold`] keeps the answers to the next requests, already
//!   computed by their handlers, until [`FakeHttp::release`] or the end of the fake: a provider
//!   that charged but whose answer never came, or a service slower than any client timeout,
//!   without a sleep that a busy machine could outlast.
//! - **An end.** The server stops on [`FakeHttp::stop`] or when the fake is dropped (a
//!   panicking test too), so a fake never outlives its test.
//!
//! # Why a crate of its own
//!
//! Both test suites need it: the unit tests inside the library and the API tests, which see
//! the library only as an outside crate. A `test-support` feature of `shers` was the other
//! way, and a dearer one: the API tests would have enabled it through a dev-dependency of
//! `shers` on itself, which makes the library a dependency of its own unit-test harness, so
//! `cargo test --lib` would compile the whole crate twice (the harness and, beside it, the
//! library with the feature); every edit to a fake would rebuild the library and the binary;
//! and `--all-features` would put the fakes into a release build. A dev-dependency crate is
//! compiled only where dev-dependencies are (tests, benches, examples), once and small:
//! `cargo build --release` never compiles it, whatever the features, and the shipped binary
//! never links it. Every dependency it names is one `shers` already builds, with a subset of
//! the features `shers` enables, so it adds no second build of any third-party crate to a test
//! build either.

// Test code: a panic here is the failing test's message, as in every test module.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake;
mod recorded;

use actix_web::HttpRequest;

pub use fake::FakeHttp;
pub use recorded::{Nth, Recorded};

/// Installs ring as the process's rustls provider: SHERS' HTTP clients are built with
/// `rustls-no-provider`, so a test that builds one without starting a fake calls this first.
/// A second call is a no-op. [`FakeHttp::start`] calls it.
pub fn install_crypto() {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
}

/// A request header as text, `None` if absent or not visible ASCII: for handlers that answer
/// by a header (an idempotency key, a signature).
pub fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A loopback port nothing listens on (bound, then released), for connection-refused tests.
///
/// # Panics
///
/// If no loopback port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
