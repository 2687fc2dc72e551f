//! Media across servers: other servers' `mxc://` content fetched (authenticated federation media,
//! `multipart/mixed`) and kept in the local store, and the body this server answers their
//! requests with.

use ruma::ServerName;

use super::incoming::urlencoding;
use crate::{
    error::{Error, Result},
    service::{media::FileInfo, Services},
    utils,
};

/// The boundary of the `multipart/mixed` answers this server gives (it cannot occur in the JSON
/// part, and a file containing it is not a problem: the length of the part is not derived from
/// it by our readers, only the final boundary ends it).
const BOUNDARY: &str = "hafen-media-8c3f2e1a9d";

/// The frame of a `multipart/mixed` answer: its `Content-Type`, what comes before the content
/// (the empty metadata object and the content part's headers) and what comes after it, so that
/// the content itself can be streamed from the media store between them.
pub fn multipart_frame(content_type: &str, disposition: &str) -> (String, String, String) {
    (
        format!("multipart/mixed; boundary={BOUNDARY}"),
        format!("--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{BOUNDARY}\r\nContent-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"),
        format!("\r\n--{BOUNDARY}--\r\n"),
    )
}

/// A whole `multipart/mixed` answer in memory (tests and small bodies).
pub fn multipart_body(content_type: &str, disposition: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let (ct, head, tail) = multipart_frame(content_type, disposition);
    let mut out = Vec::with_capacity(head.len() + bytes.len() + tail.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(tail.as_bytes());
    (ct, out)
}

/// The content part of a `multipart/mixed` media answer: its headers (lower-cased names) and
/// bytes.
pub fn parse_multipart(
    content_type: &str,
    body: &[u8],
) -> Result<(Vec<(String, String)>, Vec<u8>)> {
    let bad = || Error::bad_json("The remote media answer is not valid multipart/mixed");
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(bad)?;
    let delimiter = format!("--{boundary}").into_bytes();
    let positions: Vec<usize> = find_all(body, &delimiter);
    // Metadata part, content part, closing delimiter.
    if positions.len() < 3 {
        return Err(bad());
    }
    let start = positions[1] + delimiter.len();
    let end = positions[2];
    let part = &body[start..end];
    let part = part.strip_prefix(b"\r\n").unwrap_or(part);
    let part = part.strip_suffix(b"\r\n").unwrap_or(part);
    let split = find_all(part, b"\r\n\r\n")
        .first()
        .copied()
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&part[..split]).map_err(|_| bad())?;
    let headers = head
        .split("\r\n")
        .filter_map(|line| {
            let (k, v) = line.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .take(32)
        .collect();
    Ok((headers, part[split + 4..].to_vec()))
}

/// Where `needle` occurs in `haystack`, without overlaps (a delimiter such as `---` must not
/// be found again inside its own previous match), at most 8 times.
fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    if needle.is_empty() {
        return out;
    }
    let mut i = 0;
    while out.len() < 8 && i + needle.len() <= haystack.len() {
        if &haystack[i..i + needle.len()] == needle {
            out.push(i);
            i += needle.len();
        } else {
            i += 1;
        }
    }
    out
}

/// The file of another server's media, fetched once and then served from the local store.
pub async fn remote_file(
    services: &Services,
    server: &ServerName,
    media_id: &str,
) -> Result<FileInfo> {
    if !services.config.allow_federation && server != services.globals.server_name {
        return Err(Error::not_found("Media not found"));
    }
    crate::policy::access::check_federation(services, None, None, server, "media_fetch")?;
    if let Some(file) = services.media.remote_cached(server, media_id)? {
        return Ok(file);
    }
    if !services.config.allow_federation {
        return Err(Error::not_found("Media not found"));
    }
    let limit = usize::try_from(services.media.max_upload_size()).unwrap_or(usize::MAX);
    let path = format!(
        "/_matrix/federation/v1/media/download/{}",
        urlencoding(media_id)
    );
    let (headers, body) = services
        .federation
        .get_raw(server, &path, limit.saturating_add(64 * 1024))
        .await
        .map_err(|e| match e.errcode() {
            "M_TOO_LARGE" => e,
            _ => Error::not_found("Media not found"),
        })?;
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (part_headers, mut bytes) = parse_multipart(content_type, &body)?;
    let header = |name: &str| {
        part_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut file_type = header("content-type");
    let disposition = header("content-disposition");
    if let Some(location) = header("location") {
        let (h, b) = services.federation.get_url(&location, limit).await?;
        file_type = h
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        bytes = b;
    }
    if bytes.len() > limit {
        return Err(Error::new(
            crate::error::ErrCode::TooLarge,
            "The remote content is too large",
        ));
    }
    let filename = disposition.as_deref().and_then(filename_of);
    services
        .media
        .store_remote(
            server,
            media_id,
            bytes,
            file_type,
            filename,
            utils::now_ms(),
        )
        .await
}

/// `filename="..."` of a Content-Disposition value.
fn filename_of(disposition: &str) -> Option<String> {
    disposition
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("filename="))
        .map(|f| f.trim_matches('"').to_owned())
        .filter(|f| !f.is_empty() && f.len() <= 255 && !f.chars().any(char::is_control))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_round_trip() {
        let (ct, body) =
            multipart_body("image/png", "inline; filename=\"a.png\"", b"\x89PNG\r\n--x");
        let (headers, bytes) = parse_multipart(&ct, &body).expect("parses");
        assert_eq!(bytes, b"\x89PNG\r\n--x");
        assert!(headers.contains(&("content-type".to_owned(), "image/png".to_owned())));
        assert_eq!(
            filename_of("inline; filename=\"a.png\"").as_deref(),
            Some("a.png")
        );
        assert!(parse_multipart("multipart/mixed", &body).is_err());
        // A boundary whose delimiter overlaps itself is an error, not a panic.
        assert!(parse_multipart("multipart/mixed; boundary=-", b"-----").is_err());
        assert!(parse_multipart("multipart/mixed; boundary=-", b"---------").is_err());
        assert!(parse_multipart(&ct, b"garbage").is_err());
    }
}
