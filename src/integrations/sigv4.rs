//! AWS Signature Version 4, the request signing the Amazon SNS Query API (and every other AWS
//! API) demands, written on `hmac` + `sha2` instead of an AWS SDK.
//!
//! Pure: no I/O, no clock reads (the caller passes the time), no logging. The secret key only
//! enters [`signing_key`]; nothing here formats it into a string.
//!
//! The steps follow AWS's "Create a signed AWS API request" guide: a canonical request
//! ([`canonical_request`]), a string to sign over its SHA-256 ([`string_to_sign`]), a signing
//! key derived from the secret, the date, the region and the service ([`signing_key`]), and
//! the `Authorization` header ([`authorization`]). Known-answer tests pin AWS's published
//! example and POST-with-form-body vectors computed by botocore.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The signing algorithm's name, first word of the `Authorization` header.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The credentials and scope a request is signed for.
#[derive(Clone, Copy)]
pub struct Signer<'a> {
    /// The access key id (`AKIA…`), sent in the clear in `Authorization`.
    pub access_key_id: &'a str,
    /// The secret access key; only HMAC keys are derived from it.
    pub secret_access_key: &'a str,
    /// The region, e.g. `us-east-1`.
    pub region: &'a str,
    /// The service, e.g. `sns`.
    pub service: &'a str,
}

impl std::fmt::Debug for Signer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// The parts of an HTTP request that are signed.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// The absolute path, already URI-encoded as sent (`/` for the Query API).
    pub path: &'a str,
    /// The query string's pairs, unencoded; [`canonical_request`] encodes and sorts them.
    pub query: &'a [(&'a str, &'a str)],
    /// The headers to sign (names in any case; `host` and `x-amz-date` must be among them).
    pub headers: &'a [(&'a str, &'a str)],
    /// The body exactly as sent.
    pub body: &'a [u8],
}

/// `YYYYMMDDTHHMMSSZ`, the `X-Amz-Date` header's format.
pub fn amz_date(at: DateTime<Utc>) -> String {
    at.format("%Y%m%dT%H%M%SZ").to_string()
}

/// `YYYYMMDD/region/service/aws4_request`.
pub fn scope(at: DateTime<Utc>, region: &str, service: &str) -> String {
    format!("{}/{region}/{service}/aws4_request", at.format("%Y%m%d"))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// HMAC-SHA256 with RFC 2104 key preparation done here, so it cannot fail: a key longer than
/// the 64-byte block is hashed first, then zero-padded to the block.
fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <HmacSha256 as KeyInit>::new(&Key::<HmacSha256>::from(block));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters (`A-Za-z0-9-._~`) as-is, every
/// other byte as upper-case `%XX` (a space is `%20`, never `+`).
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b));
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Header names lower-cased and values trimmed with inner runs of spaces collapsed, sorted by
/// name; repeated names are joined with commas.
fn canonical_headers(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(headers.len());
    let mut sorted: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in sorted {
        match out.last_mut() {
            Some(last) if last.0 == k => {
                last.1.push(',');
                last.1.push_str(&v);
            }
            _ => out.push((k, v)),
        }
    }
    out
}

/// The `SignedHeaders` list: lower-case names joined by `;`.
pub fn signed_headers(headers: &[(&str, &str)]) -> String {
    canonical_headers(headers)
        .into_iter()
        .map(|(k, _)| k)
        .collect::<Vec<_>>()
        .join(";")
}

/// The canonical request: method, path, sorted encoded query, canonical headers, signed
/// header names and the body's SHA-256, one per line.
pub fn canonical_request(req: &Request<'_>) -> String {
    let mut query: Vec<(String, String)> = req
        .query
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let headers = canonical_headers(req.headers);
    let mut out = String::new();
    out.push_str(req.method);
    out.push('\n');
    out.push_str(if req.path.is_empty() { "/" } else { req.path });
    out.push('\n');
    out.push_str(&query);
    out.push('\n');
    for (k, v) in &headers {
        let _ = writeln!(out, "{k}:{v}");
    }
    out.push('\n');
    out.push_str(&signed_headers(req.headers));
    out.push('\n');
    out.push_str(&sha256_hex(req.body));
    out
}

/// `AWS4-HMAC-SHA256`, the time, the scope and the canonical request's SHA-256.
pub fn string_to_sign(at: DateTime<Utc>, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        amz_date(at),
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The signing key: `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service),
/// "aws4_request")`.
pub fn signing_key(secret: &str, at: DateTime<Utc>, region: &str, service: &str) -> [u8; 32] {
    let mut k_secret = Vec::with_capacity(secret.len().saturating_add(4));
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret.as_bytes());
    let date = at.format("%Y%m%d").to_string();
    let k_date = hmac_sha256(&k_secret, date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, b"aws4_request")
}

/// The hex signature of `req` at `at`.
pub fn signature(signer: &Signer<'_>, req: &Request<'_>, at: DateTime<Utc>) -> String {
    let scope = scope(at, signer.region, signer.service);
    let to_sign = string_to_sign(at, &scope, &canonical_request(req));
    let key = signing_key(signer.secret_access_key, at, signer.region, signer.service);
    hex(&hmac_sha256(&key, to_sign.as_bytes()))
}

/// The `Authorization` header value for `req` signed at `at` (whose `x-amz-date` header must
/// carry [`amz_date`]`(at)`).
pub fn authorization(signer: &Signer<'_>, req: &Request<'_>, at: DateTime<Utc>) -> String {
    format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={}",
        signer.access_key_id,
        scope(at, signer.region, signer.service),
        signed_headers(req.headers),
        signature(signer, req, at)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// AWS's documentation example secret (not a real credential).
    const EXAMPLE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const EXAMPLE_KEY_ID: &str = "AKIDEXAMPLE";

    fn example_time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2015, 8, 30, 12, 36, 0).unwrap()
    }

    #[test]
    fn signing_key_matches_the_documented_example() {
        // "Examples of how to derive a signing key for Signature Version 4" (AWS General
        // Reference): 20150830, us-east-1, iam.
        let key = signing_key(EXAMPLE_SECRET, example_time(), "us-east-1", "iam");
        assert_eq!(
            hex(&key),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
    }

    #[test]
    fn the_documented_iam_list_users_request_signs_to_the_published_signature() {
        // AWS General Reference, "Signature Version 4 signing process" worked example:
        // GET https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08.
        let at = example_time();
        let headers = [
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("Host", "iam.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
        ];
        let req = Request {
            method: "GET",
            path: "/",
            query: &[("Action", "ListUsers"), ("Version", "2010-05-08")],
            headers: &headers,
            body: b"",
        };
        let canonical = canonical_request(&req);
        assert_eq!(
            canonical,
            "GET\n/\nAction=ListUsers&Version=2010-05-08\n\
             content-type:application/x-www-form-urlencoded; charset=utf-8\n\
             host:iam.amazonaws.com\nx-amz-date:20150830T123600Z\n\n\
             content-type;host;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(canonical.as_bytes()),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        let signer = Signer {
            access_key_id: EXAMPLE_KEY_ID,
            secret_access_key: EXAMPLE_SECRET,
            region: "us-east-1",
            service: "iam",
        };
        assert_eq!(
            signature(&signer, &req, at),
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
        assert_eq!(
            authorization(&signer, &req, at),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    /// A Query API publish signed at 2026-12-08T01:02:03Z with the example credentials; the
    /// expected values were computed with botocore's `SigV4Auth` (service `sns`), which the
    /// AWS CLI and boto3 sign with.
    fn botocore_vector(url_host: &str, region: &str, body: &str, hashed: &str, sig: &str) {
        let at = Utc.with_ymd_and_hms(2026, 12, 8, 1, 2, 3).unwrap();
        let date = amz_date(at);
        assert_eq!(date, "20261208T010203Z");
        let headers = [
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("Host", url_host),
            ("X-Amz-Date", date.as_str()),
        ];
        let req = Request {
            method: "POST",
            path: "/",
            query: &[],
            headers: &headers,
            body: body.as_bytes(),
        };
        assert_eq!(
            canonical_request(&req),
            format!(
                "POST\n/\n\ncontent-type:application/x-www-form-urlencoded; charset=utf-8\n\
                 host:{url_host}\nx-amz-date:20261208T010203Z\n\n\
                 content-type;host;x-amz-date\n{hashed}"
            )
        );
        let signer = Signer {
            access_key_id: EXAMPLE_KEY_ID,
            secret_access_key: EXAMPLE_SECRET,
            region,
            service: "sns",
        };
        assert_eq!(
            authorization(&signer, &req, at),
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261208/{region}/sns/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, Signature={sig}"
            )
        );
    }

    /// The SMS publish body [`crate::integrations::notify`] sends (its test checks it builds
    /// exactly this).
    pub(crate) const BOTOCORE_SMS_BODY: &str = "Action=Publish&Version=2010-03-31&\
        PhoneNumber=%2B447700900123&Message=Help+is+on+its+way.+Ref+INC-1&\
        MessageAttributes.entry.1.Name=AWS.SNS.SMS.SMSType&\
        MessageAttributes.entry.1.Value.DataType=String&\
        MessageAttributes.entry.1.Value.StringValue=Transactional";

    #[test]
    fn an_sms_publish_signs_as_botocore_signs_it() {
        botocore_vector(
            "sns.us-east-1.amazonaws.com",
            "us-east-1",
            BOTOCORE_SMS_BODY,
            "b82058fddcc12d485968791f426b110880c7fbc92d4afa697ab3da2539ebc3bc",
            "90bc28a6c0a01791cd8b888ded7ae84e6305b4306a121c505dfb6ff1469d6d46",
        );
    }

    #[test]
    fn a_topic_publish_to_a_host_with_a_port_signs_as_botocore_signs_it() {
        botocore_vector(
            "127.0.0.1:4566",
            "eu-west-1",
            "Action=Publish&Version=2010-03-31&\
             TopicArn=arn%3Aaws%3Asns%3Aeu-west-1%3A123456789012%3Anext-of-kin&\
             Message=caf%C3%A9&MessageAttributes.entry.1.Name=patient_id&\
             MessageAttributes.entry.1.Value.DataType=String&\
             MessageAttributes.entry.1.Value.StringValue=p-1",
            "51b9c59c7c129a6acfc44259f6609577f452016fca73c0fdb88339cc57e913ae",
            "1c8a6b01acfbf82c116fca2d9a0257e09a8341ba9fd90b71307b443f6a199ae6",
        );
    }

    #[test]
    fn a_changed_byte_changes_the_signature() {
        let headers = [("host", "sns.eu-west-1.amazonaws.com"), ("x-amz-date", "x")];
        let signer = Signer {
            access_key_id: EXAMPLE_KEY_ID,
            secret_access_key: EXAMPLE_SECRET,
            region: "eu-west-1",
            service: "sns",
        };
        let sig = |body: &[u8]| {
            let req = Request {
                method: "POST",
                path: "/",
                query: &[],
                headers: &headers,
                body,
            };
            signature(&signer, &req, example_time())
        };
        assert_ne!(sig(b"Action=Publish"), sig(b"Action=Publisx"));
    }

    #[test]
    fn headers_are_lower_cased_trimmed_collapsed_and_sorted() {
        let headers = [
            ("X-B", "  a   b  "),
            ("host", "h"),
            ("x-b", "c"),
            ("A", "1"),
        ];
        assert_eq!(signed_headers(&headers), "a;host;x-b");
        let canonical = canonical_request(&Request {
            method: "POST",
            path: "/",
            query: &[("b", "x y"), ("a", "~/")],
            headers: &headers,
            body: b"",
        });
        assert!(canonical.starts_with("POST\n/\na=~%2F&b=x%20y\na:1\nhost:h\nx-b:a b,c\n\n"));
    }
}
