//! Outbound adapters behind traits (routing, payments, insurance, notifications), each a real
//! HTTP/SMTP client with a base URL from configuration so tests point them at local fakes.

#[cfg(test)]
pub(crate) mod fake_http;
pub mod notify;
pub mod payments;
pub mod routing;
