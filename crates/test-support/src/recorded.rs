//! What a fake remembers of a request ([`Recorded`]) and the position a handler can answer by
//! ([`Nth`]). Plain data: nothing here talks to the network.

use std::collections::HashMap;
use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::http::Method;
use actix_web::http::header::HeaderMap;
use actix_web::web::{self, Bytes};
use actix_web::{FromRequest, HttpMessage as _, HttpRequest};

/// One request as the fake received it, before its handler ran.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `POST`, …
    pub method: Method,
    /// The path, without the query string.
    pub path: String,
    /// The query string without its `?`, empty when there is none.
    pub query: String,
    /// Every header the client sent.
    pub headers: HeaderMap,
    /// The body exactly as it arrived (not decoded).
    pub body: Bytes,
}

impl Recorded {
    /// A header as text, `None` if absent or not visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as UTF-8 text (invalid sequences replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body decoded as `application/x-www-form-urlencoded` by actix-web's own decoder
    /// (the one `web::Form` uses). Like that decoder it is lenient: a malformed escape stays
    /// as it is, invalid UTF-8 is replaced, and a repeated name keeps its last value.
    pub fn form(&self) -> HashMap<String, String> {
        // Into a map of strings the decoder cannot fail; an empty map is the honest answer
        // should a future version refuse something.
        web::Query::<HashMap<String, String>>::from_query(&self.text())
            .map(web::Query::into_inner)
            .unwrap_or_default()
    }

    /// `path?query`, or the path alone when there is no query.
    pub fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// The request's position in its fake's journal, counting from 0: a handler that takes it as
/// an argument can script its answers by call ("the first call gets a 429").
///
/// Extracting it from a request that no [`FakeHttp`](crate::FakeHttp) recorded is an error
/// (500).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nth(pub usize);

impl FromRequest for Nth {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(req.extensions().get::<Nth>().copied().ok_or_else(|| {
            actix_web::error::ErrorInternalServerError("the request was not recorded by a fake")
        }))
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{CONTENT_TYPE, HeaderValue};

    use super::*;

    fn recorded(query: &str, body: &str) -> Recorded {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        Recorded {
            method: Method::POST,
            path: "/v1/things".to_owned(),
            query: query.to_owned(),
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn headers_forms_and_paths_read_back() {
        let r = recorded("a=1&b=2", "To=%2B1+555&Body=a%26b&To=%2B2");
        assert_eq!(
            r.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(r.header("authorization"), None);
        assert_eq!(r.text(), "To=%2B1+555&Body=a%26b&To=%2B2");
        let form = r.form();
        assert_eq!(form.len(), 2);
        assert_eq!(form["To"], "+2");
        assert_eq!(form["Body"], "a&b");
        assert_eq!(r.path_and_query(), "/v1/things?a=1&b=2");
        assert_eq!(recorded("", "").path_and_query(), "/v1/things");
        let lenient = recorded("", "%zz=%FF").form();
        assert_eq!(lenient["%zz"], "\u{FFFD}");
    }
}
