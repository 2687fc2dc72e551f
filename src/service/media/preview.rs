//! URL previews: fetch a page (or image) for a user and read its OpenGraph data.
//!
//! Safety: the host is resolved here, every address it resolves to must be public (or in the
//! operator's allowlist, see [`super::addr`]), and the connection goes to exactly the checked
//! address (the HTTP client is pinned to it, so nothing resolves the name again). Redirects are
//! followed by hand with the same check at every hop, at most [`MAX_REDIRECTS`]. Bodies are read
//! up to a limit and the whole fetch has a timeout. No proxy from the environment is used.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use ipnet::IpNet;
use parking_lot::Mutex;
use serde_json::{Map, Value};

use super::addr;
use crate::error::{ErrCode, Error, Result};

pub const MAX_REDIRECTS: usize = 5;
/// Most bytes of a page we read (the OpenGraph tags are in its head).
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Most bytes of a preview image.
pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;
/// Time for one fetch, all hops included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a preview is reused.
pub const CACHE_TTL_MS: u64 = 3600 * 1000;
const CACHE_MAX_ENTRIES: usize = 1000;
const MAX_OG_KEYS: usize = 50;
const MAX_VALUE_CHARS: usize = 2000;

/// What a fetch brought back.
pub struct Fetched {
    pub content_type: String,
    pub body: Bytes,
    /// The URL after redirects (relative `og:image` URLs are resolved against it).
    pub url: url::Url,
}

/// Refusals and failures, as the client sees them.
pub fn blocked() -> Error {
    Error::forbidden("The URL points to an address that previews may not reach")
}

fn fetch_failed(what: impl std::fmt::Display) -> Error {
    Error::with_status(
        ErrCode::Unknown,
        http::StatusCode::BAD_GATEWAY,
        format!("Could not fetch the URL: {what}"),
    )
}

/// Parse a URL a client asked to preview: http or https with a host.
pub fn parse_url(raw: &str) -> Result<url::Url> {
    let url = url::Url::parse(raw).map_err(|_| Error::invalid_param("url is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(Error::invalid_param("url must be an http or https URL"));
    }
    Ok(url)
}

/// The fetcher, with the operator's allowlist.
pub struct Fetcher {
    allow: Vec<IpNet>,
}

impl Fetcher {
    pub fn new(allow: &[String]) -> Fetcher {
        Fetcher {
            allow: allow.iter().filter_map(|r| r.parse().ok()).collect(),
        }
    }

    /// The one address of `url`'s host we connect to, after checking all it resolves to.
    async fn checked_addr(&self, url: &url::Url) -> Result<SocketAddr> {
        let port = url
            .port_or_known_default()
            .ok_or_else(|| Error::invalid_param("url has no port"))?;
        let addrs: Vec<SocketAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
            Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
            Some(url::Host::Domain(d)) => tokio::net::lookup_host((d, port))
                .await
                .map_err(|e| fetch_failed(format!("cannot resolve {d}: {e}")))?
                .collect(),
            None => return Err(Error::invalid_param("url has no host")),
        };
        if addrs.is_empty() {
            return Err(fetch_failed("the host has no address"));
        }
        // One bad address refuses the host: which one a client library picks is not ours to know.
        if addrs
            .iter()
            .any(|a| !addr::may_connect(a.ip(), &self.allow))
        {
            return Err(blocked());
        }
        Ok(addrs[0])
    }

    /// GET `url`, following up to [`MAX_REDIRECTS`] redirects, each hop checked; the body is
    /// read up to `limit` bytes (a longer one is cut there).
    pub async fn fetch(&self, url: url::Url, limit: usize) -> Result<Fetched> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_inner(url, limit))
            .await
            .map_err(|_| fetch_failed("timed out"))?
    }

    async fn fetch_inner(&self, mut url: url::Url, limit: usize) -> Result<Fetched> {
        for _ in 0..=MAX_REDIRECTS {
            let target = self.checked_addr(&url).await?;
            let mut builder = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(FETCH_TIMEOUT)
                .user_agent("Hafen URL preview");
            if let Some(url::Host::Domain(d)) = url.host() {
                // Pin the name to the address we checked: the client must not resolve it again.
                builder = builder.resolve(d, target);
            }
            let client = builder.build().map_err(fetch_failed)?;
            let mut res = client
                .get(url.clone())
                .header(http::header::ACCEPT, "text/html, image/*;q=0.9, */*;q=0.1")
                .send()
                .await
                .map_err(fetch_failed)?;
            if res.status().is_redirection() {
                let location = res
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| fetch_failed("redirect without a location"))?;
                let next = url
                    .join(location)
                    .map_err(|_| fetch_failed("redirect to an invalid URL"))?;
                url = parse_url(next.as_str())?;
                continue;
            }
            if !res.status().is_success() {
                return Err(fetch_failed(format!("status {}", res.status())));
            }
            let content_type = res
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            let mut body = Vec::new();
            while let Some(chunk) = res.chunk().await.map_err(fetch_failed)? {
                let room = limit.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= limit {
                    break;
                }
            }
            return Ok(Fetched {
                content_type,
                body: body.into(),
                url,
            });
        }
        Err(fetch_failed("too many redirects"))
    }
}

/// Previews kept for a while, in memory only (the URLs users look at are theirs, not the
/// database's), bounded in count.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<String, (u64, Value)>>,
}

impl Cache {
    pub fn get(&self, url: &str, now: u64) -> Option<Value> {
        let entries = self.entries.lock();
        entries
            .get(url)
            .filter(|(at, _)| now.saturating_sub(*at) < CACHE_TTL_MS)
            .map(|(_, v)| v.clone())
    }

    pub fn put(&self, url: String, value: Value, now: u64) {
        let mut entries = self.entries.lock();
        if entries.len() >= CACHE_MAX_ENTRIES {
            entries.retain(|_, (at, _)| now.saturating_sub(*at) < CACHE_TTL_MS);
            if entries.len() >= CACHE_MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(url, (now, value));
    }
}

/// The OpenGraph data of an HTML page: every `og:*` meta tag, with `<title>` and the
/// description meta tag as fallbacks for `og:title` and `og:description`.
pub fn opengraph(html: &str) -> Map<String, Value> {
    let mut og = Map::new();
    let mut title = None;
    let mut description = None;
    let mut title_unclosed = false;
    let lower = html.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(start) = lower[pos..].find('<').map(|i| pos + i) {
        let Some(end) = lower[start..].find('>').map(|i| start + i) else {
            break;
        };
        let tag = &html[start + 1..end];
        let tag_lower = &lower[start + 1..end];
        pos = end + 1;
        if tag_lower.starts_with("title") && title.is_none() && !title_unclosed {
            // Searched once: a page of unclosed titles must not make this quadratic.
            match lower[pos..].find("</title") {
                Some(close) => title = Some(decode_entities(html[pos..pos + close].trim())),
                None => title_unclosed = true,
            }
        } else if tag_lower.starts_with("meta") {
            let attrs = attributes(tag);
            let key = attrs
                .iter()
                .find(|(k, _)| k == "property" || k == "name")
                .map(|(_, v)| v.clone());
            let content = attrs.iter().find(|(k, _)| k == "content").map(|(_, v)| v);
            if let (Some(key), Some(content)) = (key, content) {
                let content: String = content.chars().take(MAX_VALUE_CHARS).collect();
                if key.starts_with("og:") && og.len() < MAX_OG_KEYS && !og.contains_key(&key) {
                    og.insert(key, Value::String(content));
                } else if key.eq_ignore_ascii_case("description") && description.is_none() {
                    description = Some(content);
                }
            }
        } else if tag_lower.starts_with("body") {
            // OpenGraph lives in the head.
            break;
        }
    }
    if !og.contains_key("og:title") {
        if let Some(t) = title.filter(|t| !t.is_empty()) {
            og.insert(
                "og:title".into(),
                Value::String(t.chars().take(MAX_VALUE_CHARS).collect()),
            );
        }
    }
    if !og.contains_key("og:description") {
        if let Some(d) = description {
            og.insert("og:description".into(), Value::String(d));
        }
    }
    og
}

/// The attributes of a tag (`meta property="og:title" content="..."`), names lower-cased and
/// values with entities decoded.
fn attributes(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let chars: Vec<char> = tag.chars().collect();
    // Skip the tag name.
    let mut i = chars
        .iter()
        .position(|c| c.is_whitespace())
        .unwrap_or(chars.len());
    while i < chars.len() {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == '/') {
            i += 1;
        }
        let name_start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' && chars[i] != '/' {
            i += 1;
        }
        let name: String = chars[name_start..i]
            .iter()
            .collect::<String>()
            .to_ascii_lowercase();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < chars.len() && chars[i] == '=' {
            i += 1;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if i < chars.len() && (chars[i] == '"' || chars[i] == '\'') {
                let quote = chars[i];
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != quote {
                    i += 1;
                }
                value = chars[start..i].iter().collect();
                i += 1;
            } else {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() {
                    i += 1;
                }
                value = chars[start..i].iter().collect();
            }
        }
        if !name.is_empty() {
            out.push((name, decode_entities(&value)));
        }
    }
    out
}

/// Decode the HTML character references pages use in titles and descriptions.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';').filter(|&i| i <= 12) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opengraph_tags_and_fallbacks() {
        let html = r#"<!doctype html><html><head>
            <TITLE>Fallback &amp; title</TITLE>
            <meta property="og:title" content="The &quot;real&quot; title">
            <meta property='og:description' content='About &#x263A; things'/>
            <meta name="description" content="ignored: og:description is there">
            <meta property="og:image" content="/img.png">
            </head><body><meta property="og:late" content="not read"></body></html>"#;
        let og = opengraph(html);
        assert_eq!(og["og:title"], "The \"real\" title");
        assert_eq!(og["og:description"], "About \u{263a} things");
        assert_eq!(og["og:image"], "/img.png");
        assert!(!og.contains_key("og:late"));
    }

    #[test]
    fn title_and_description_fill_in() {
        let og = opengraph(
            "<html><head><title> Plain page </title><meta name=description content=Short></head>",
        );
        assert_eq!(og["og:title"], "Plain page");
        assert_eq!(og["og:description"], "Short");
        assert!(opengraph("no html at all").is_empty());
        assert!(opengraph("<meta property=\"og:title\" content=\"unterminated").is_empty());
    }

    #[test]
    fn urls_must_be_http() {
        assert!(parse_url("https://example.org/x").is_ok());
        assert_eq!(
            parse_url("file:///etc/passwd").err().unwrap().errcode(),
            "M_INVALID_PARAM"
        );
        assert_eq!(
            parse_url("not a url").err().unwrap().errcode(),
            "M_INVALID_PARAM"
        );
    }

    #[tokio::test]
    async fn internal_hosts_are_refused_before_connecting() {
        let f = Fetcher::new(&[]);
        for u in [
            "http://127.0.0.1:1/",
            "http://[::1]:1/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://localhost:1/",
            "http://[::ffff:127.0.0.1]:1/",
        ] {
            let e = f.fetch(parse_url(u).unwrap(), 10).await.err().unwrap();
            assert_eq!(e.errcode(), "M_FORBIDDEN", "{u}");
        }
    }
}

/// Property tests: any page (the HTML of whatever URL a user previews) is read without panic
/// and within the bounds on keys and value lengths.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, edit_text, edits, text};

    /// Pieces of HTML that make up plausible, broken and hostile pages.
    fn page() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            text(),
            "<meta (property|name)=[\"']?og:[a-z]{1,6}[\"']? content=[\"']?[^\"'<>]{0,30}[\"']?/?>",
            "<title>[^<]{0,30}(</title>)?",
            "&(amp|lt|#x[0-9a-fA-F]{0,8}|#[0-9]{0,12}|[a-z]{0,14});?",
            Just("<meta name=description content='x".to_owned()),
            Just("<<<>>><body>".to_owned()),
            (1usize..3000).prop_map(|n| "<meta property=og:x content=".repeat(n)),
        ];
        prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn fuzz_pages(html in prop_oneof![page(), (page(), edits()).prop_map(|(p, e)| edit_text(&p, &e))]) {
            let og = opengraph(&html);
            // og:* tags, plus the title and description fallbacks.
            prop_assert!(og.len() <= MAX_OG_KEYS + 2);
            for (k, v) in &og {
                prop_assert!(k.starts_with("og:"));
                let v = v.as_str().expect("strings");
                prop_assert!(v.chars().count() <= MAX_VALUE_CHARS);
            }
            let _ = decode_entities(&html);
        }

    }

    #[test]
    fn fuzz_many_tags_stay_bounded() {
        let html: String = (0..80)
            .map(|i| {
                format!(
                    "<meta property=\"og:k{i}\" content=\"{}\">",
                    "v".repeat(2100)
                )
            })
            .collect();
        let og = opengraph(&html);
        assert_eq!(og.len(), MAX_OG_KEYS);
        assert!(og
            .values()
            .all(|v| v.as_str().is_some_and(|s| s.len() == MAX_VALUE_CHARS)));
    }
}
