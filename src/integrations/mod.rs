//! Outbound adapters behind traits (routing, payments, insurance, notifications), each a real
//! HTTP/SMTP client with a base URL from configuration so tests point them at local fakes.

pub mod notify;
pub mod payments;
pub mod routing;
