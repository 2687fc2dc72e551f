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

/// The frame of a `multipart/mixed` answer: its `Content-Type`, what comes before the content
/// (the empty metadata object and the content part's headers) and what comes after it, so that
/// the content itself can be streamed from the media store between them.
///
/// Readers end the content at the first delimiter after it (RFC 2046 forbids it inside a part),
/// so the boundary is random for every answer: a file cannot contain it by accident, and an
/// uploader cannot know it in advance to make other servers cut the file short.
pub fn multipart_frame(content_type: &str, disposition: &str) -> (String, String, String) {
    let boundary = format!("hafen-{}", utils::random_string(32));
    (
        format!("multipart/mixed; boundary={boundary}"),
        format!("--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"),
        format!("\r\n--{boundary}--\r\n"),
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
    header_params(disposition)
        .into_iter()
        .find_map(|(k, v)| (k == "filename").then_some(v))
        .filter(|f| !f.is_empty() && f.len() <= 255 && !f.chars().any(char::is_control))
}

/// The parameters of a header value such as `attachment; filename="a; b.txt"` (at most 16):
/// names lower-cased, quoted values unquoted (RFC 9110 quoted-string: a `;` inside the quotes
/// belongs to the value, `\` escapes the next character).
fn header_params(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some((_, params)) = value.split_once(';') else {
        return out;
    };
    let mut chars = params.chars().peekable();
    // Every round consumes at least one character, or ends.
    while out.len() < 16 {
        let mut name = String::new();
        let mut has_value = false;
        for c in chars.by_ref() {
            match c {
                '=' => {
                    has_value = true;
                    break;
                }
                ';' => break,
                c => name.push(c),
            }
        }
        if !has_value {
            if chars.peek().is_none() {
                break;
            }
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
            // Anything between the closing quote and the next parameter is ignored.
            for c in chars.by_ref() {
                if c == ';' {
                    break;
                }
            }
        } else {
            for c in chars.by_ref() {
                if c == ';' {
                    break;
                }
                value.push(c);
            }
            value = value.trim().to_owned();
        }
        out.push((name.trim().to_ascii_lowercase(), value));
        if chars.peek().is_none() {
            break;
        }
    }
    out
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
        // A `;` inside the quotes is part of the name (such names were cut short at the `;`;
        // `fuzz_our_answer_round_trips` checks every name), escapes are undone, unquoted values
        // end at `;`.
        assert_eq!(
            filename_of("attachment; filename=\"a; b.txt\"; size=3").as_deref(),
            Some("a; b.txt")
        );
        assert_eq!(
            filename_of(r#"attachment; x="y;filename=z"; filename="q\"r""#).as_deref(),
            Some("q\"r")
        );
        assert_eq!(
            filename_of("attachment;filename=plain.txt ;x=1").as_deref(),
            Some("plain.txt")
        );
        assert_eq!(filename_of("attachment; filename=\"\""), None);
        assert_eq!(filename_of("filename=\"no-type.txt\""), None);
        assert!(parse_multipart("multipart/mixed", &body).is_err());
        // A boundary whose delimiter overlaps itself is an error, not a panic.
        assert!(parse_multipart("multipart/mixed; boundary=-", b"-----").is_err());
        assert!(parse_multipart("multipart/mixed; boundary=-", b"---------").is_err());
        assert!(parse_multipart(&ct, b"garbage").is_err());

        // A file holding the boundary all answers used to have reads back whole: every answer
        // has its own random boundary (`fuzz_our_answer_round_trips` cut such files short).
        let file = b"--hafen-media-8c3f2e1a9d\r\n--hafen-media-8c3f2e1a9d--\r\n";
        let (ct, body) = multipart_body("text/plain", "inline", file);
        assert_eq!(parse_multipart(&ct, &body).expect("parses").1, file);
        assert_ne!(multipart_frame("a/b", "inline").0, ct);
    }
}

/// Property tests: any answer is parsed without panic and within its bounds, and what we write
/// is read back as it was, whatever the file holds. The parser is called in one place
/// ([`fuzz::parse`]) so that a new signature of it is one change here.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{apply_edits, config, edits, text};

    type Parsed = (Vec<(String, String)>, Vec<u8>);

    fn parse(content_type: &str, body: &[u8]) -> Result<Parsed> {
        parse_multipart(content_type, body)
    }

    fn content_type() -> impl Strategy<Value = String> {
        prop_oneof![
            text(),
            "multipart/mixed; boundary=\"?[-a-z0-9]{0,12}\"?",
            Just("multipart/mixed; boundary=-".to_owned()),
            Just("multipart/mixed; boundary=hafen-media-8c3f2e1a9d".to_owned()),
            Just("multipart/mixed; boundary=".to_owned()),
            Just(format!("multipart/mixed; boundary={}", "b".repeat(201))),
        ]
    }

    /// File contents full of what a reader might mistake for structure.
    fn content() -> impl Strategy<Value = Vec<u8>> {
        let marks: Vec<&'static [u8]> = vec![
            b"\r\n",
            b"\r\n\r\n",
            b"--",
            b"--hafen-",
            b"--hafen-media-8c3f2e1a9d",
            b"--hafen-media-8c3f2e1a9d--\r\n",
            b"Content-Type: text/html\r\n",
            b"\xff\xfe",
        ];
        let piece = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::sample::select(marks).prop_map(<[u8]>::to_vec),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_any_answer_parses_without_panic(
            ct in content_type(),
            body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..512),
                content(),
                (content(), edits()).prop_map(|(c, e)| {
                    let (_, body) = multipart_body("image/png", "inline", &c);
                    apply_edits(body, &e)
                }),
            ],
        ) {
            if let Ok((headers, bytes)) = parse(&ct, &body) {
                prop_assert!(headers.len() <= 32);
                prop_assert!(bytes.len() <= body.len());
            }
        }

        #[test]
        fn fuzz_our_answer_round_trips(
            ct in "[a-z]{1,12}/[a-z0-9.+-]{1,20}",
            filename in prop::option::of(prop_oneof![
                "[a-zA-Z0-9 ;=.,_'()-]{0,30}",
                "[^\"\\\\\\x00-\\x1f\\x7f]{0,40}",
            ]),
            bytes in content(),
        ) {
            let disposition = match &filename {
                Some(f) => format!("attachment; filename=\"{f}\""),
                None => "attachment".to_owned(),
            };
            let (multipart_ct, body) = multipart_body(&ct, &disposition, &bytes);
            let (headers, parsed) = parse(&multipart_ct, &body).expect("our answer parses");
            prop_assert_eq!(parsed, bytes);
            prop_assert!(headers.contains(&("content-type".to_owned(), ct.clone())));
            prop_assert!(headers.contains(&("content-disposition".to_owned(), disposition.trim().to_owned())));
            let name = filename.filter(|f| !f.is_empty() && !f.chars().any(char::is_control));
            prop_assert_eq!(filename_of(&disposition), name);
        }

        #[test]
        fn fuzz_filenames_are_bounded(disposition in text()) {
            if let Some(name) = filename_of(&disposition) {
                prop_assert!(!name.is_empty() && name.len() <= 255);
                prop_assert!(!name.chars().any(char::is_control));
            }
        }
    }
}
