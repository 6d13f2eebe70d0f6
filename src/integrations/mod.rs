//! Outbound adapters behind traits (routing, payments, insurance, notifications), each a real
//! HTTP/SMTP client with a base URL from configuration so tests point them at local fakes
//! (`shers_test_support::FakeHttp`, a dev-dependency: the fakes never ship).

pub mod notify;
pub mod payments;
pub mod push;
pub mod routing;
pub mod sigv4;
