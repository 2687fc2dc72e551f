//! Media across servers: other servers' `mxc://` content fetched (authenticated federation media,
//! `multipart/mixed`) and kept in the local store, and the body this server answers their
//! requests with.

use ruma::{OwnedServerName, ServerName};

use super::{incoming::urlencoding, BodyStream};
use crate::service::inflight::InFlight;
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

/// Most bytes read before the content part's bytes begin (the metadata part and the headers).
const MAX_HEAD: usize = 64 * 1024;

/// The content part of a `multipart/mixed` media answer: its headers (lower-cased names) and,
/// as a stream, its bytes. Only the head (at most [`MAX_HEAD`]) is held in memory; the content
/// is passed on as it arrives, less the few bytes that could be the start of the closing
/// delimiter. An answer that ends without the closing delimiter ends the stream with an error,
/// so a cut-off file is never kept.
pub async fn split_multipart(
    content_type: &str,
    mut body: BodyStream,
) -> Result<(Vec<(String, String)>, BodyStream)> {
    use futures_util::StreamExt;
    let delimiter = format!("--{}", boundary_of(content_type)?).into_bytes();
    let mut head: Vec<u8> = Vec::new();
    // The head is parsed again each time it has doubled (and at the end of the answer), not
    // after every chunk: an answer sent a byte at a time costs a few passes, not one per byte.
    let mut parse_at = 0;
    let mut ended = false;
    let (headers, content_start) = loop {
        if head.len() >= parse_at || ended {
            if let Some(found) = parse_head(&head, &delimiter)? {
                break found;
            }
            if ended || head.len() > MAX_HEAD {
                return Err(not_multipart());
            }
            parse_at = head
                .len()
                .saturating_mul(2)
                .min(MAX_HEAD + 1)
                .max(head.len() + 1);
        }
        match body.next().await {
            Some(chunk) => head.extend_from_slice(&chunk?),
            None => ended = true,
        }
    };
    let mut closing = b"\r\n".to_vec();
    closing.extend_from_slice(&delimiter);
    let state = ContentState {
        body,
        pending: head.split_off(content_start),
        closing,
        searched: 0,
        finished: false,
    };
    Ok((
        headers,
        Box::pin(futures_util::stream::unfold(state, next_content)),
    ))
}

/// A whole `multipart/mixed` answer in memory: the content part's headers and bytes (tests,
/// fuzzing; the server reads answers with [`split_multipart`]).
pub async fn parse_multipart(
    content_type: &str,
    body: &[u8],
) -> Result<(Vec<(String, String)>, Vec<u8>)> {
    use futures_util::StreamExt;
    let chunk = bytes::Bytes::copy_from_slice(body);
    let (headers, mut content) = split_multipart(
        content_type,
        Box::pin(futures_util::stream::iter([Ok(chunk)])),
    )
    .await?;
    let mut out = Vec::new();
    while let Some(chunk) = content.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok((headers, out))
}

fn not_multipart() -> Error {
    Error::bad_json("The remote media answer is not valid multipart/mixed")
}

fn boundary_of(content_type: &str) -> Result<&str> {
    content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(not_multipart)
}

/// The content part's headers and where its bytes start.
type PartHead = (Vec<(String, String)>, usize);

/// Once `head` holds the metadata part and the content part's headers: those headers and where
/// the content starts. `None` while more bytes are needed.
fn parse_head(head: &[u8], delimiter: &[u8]) -> Result<Option<PartHead>> {
    // The first delimiter opens the metadata part, the second the content part.
    let positions = find_all(head, delimiter);
    let Some(&second) = positions.get(1) else {
        return Ok(None);
    };
    let part_start = second + delimiter.len();
    let part = &head[part_start..];
    let Some(split) = find_all(part, b"\r\n\r\n").first().copied() else {
        return Ok(None);
    };
    let head_text = std::str::from_utf8(&part[..split]).map_err(|_| not_multipart())?;
    let headers = head_text
        .split("\r\n")
        .filter_map(|line| {
            let (k, v) = line.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .take(32)
        .collect();
    Ok(Some((headers, part_start + split + 4)))
}

struct ContentState {
    body: BodyStream,
    /// Content read but not passed on yet.
    pending: Vec<u8>,
    /// `\r\n--boundary`: the content ends where it begins.
    closing: Vec<u8>,
    /// How much of `pending` was searched for `closing` already.
    searched: usize,
    finished: bool,
}

/// The next piece of the content part (see [`split_multipart`]).
async fn next_content(mut st: ContentState) -> Option<(Result<bytes::Bytes>, ContentState)> {
    use futures_util::StreamExt;
    // The bytes that may be the start of the closing delimiter stay behind; the rest goes on
    // once this much has gathered (tiny chunks are not passed on, nor searched, one by one).
    const PASS_ON_AT: usize = 16 * 1024;
    let keep = st.closing.len().saturating_sub(1);
    loop {
        if st.finished {
            return None;
        }
        // Only what was not searched yet, and the bytes before it a match could start in: every
        // byte is looked at a bounded number of times however the answer is chunked.
        let from = st.searched.saturating_sub(keep);
        if let Some(end) = find_all(&st.pending[from..], &st.closing)
            .first()
            .map(|i| i + from)
        {
            st.finished = true;
            let content = bytes::Bytes::copy_from_slice(&st.pending[..end]);
            st.pending = Vec::new();
            return Some((Ok(content), st));
        }
        st.searched = st.pending.len();
        if st.pending.len() >= keep + PASS_ON_AT {
            let rest = st.pending.split_off(st.pending.len() - keep);
            st.searched = rest.len();
            let content = std::mem::replace(&mut st.pending, rest);
            return Some((Ok(content.into()), st));
        }
        match st.body.next().await {
            Some(Ok(chunk)) => st.pending.extend_from_slice(&chunk),
            Some(Err(e)) => {
                st.finished = true;
                return Some((Err(e), st));
            }
            None => {
                st.finished = true;
                return Some((Err(not_multipart()), st));
            }
        }
    }
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

/// Remote media fetched at once, server-wide: each holds a connection and a temp file, never
/// the file in memory.
pub const MAX_REMOTE_FETCHES: usize = 16;
/// Remote media fetches one requester (a user, or an address for the unauthenticated legacy
/// endpoints) may have running or waiting at once.
pub const MAX_REMOTE_FETCHES_PER_REQUESTER: usize = 4;

/// The bounds on fetching other servers' media (see [`remote_file`]).
pub struct RemoteFetches {
    /// One fetch per media at a time (others wait for it and then read the stored copy); at most
    /// [`MAX_REMOTE_FETCHES_PER_REQUESTER`] per requester.
    by_media: InFlight<(OwnedServerName, String), String>,
    permits: tokio::sync::Semaphore,
}

impl Default for RemoteFetches {
    fn default() -> Self {
        RemoteFetches {
            by_media: InFlight::new(MAX_REMOTE_FETCHES_PER_REQUESTER),
            permits: tokio::sync::Semaphore::new(MAX_REMOTE_FETCHES),
        }
    }
}

/// The file of another server's media, fetched once and then served from the local store.
/// `requester` names who asked (their fetches are bounded, see [`RemoteFetches`]). The answer
/// is streamed to a temp file under `max_upload_size`: memory holds a chunk, not the file.
pub async fn remote_file(
    services: &Services,
    server: &ServerName,
    media_id: &str,
    requester: &str,
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
    let fetches = &services.federation.media_fetches;
    let _this_media = fetches
        .by_media
        .acquire(
            (server.to_owned(), media_id.to_owned()),
            requester.to_owned(),
        )
        .await?;
    // Fetched by whoever held the slot before us.
    if let Some(file) = services.media.remote_cached(server, media_id)? {
        return Ok(file);
    }
    let _permit = fetches
        .permits
        .acquire()
        .await
        .map_err(|_| Error::internal("remote media fetches closed"))?;
    fetch_and_store(services, server, media_id)
        .await
        .map_err(|e| match e.errcode() {
            "M_TOO_LARGE" => e,
            _ => {
                tracing::info!(%server, media_id, error = %e, "remote media fetch failed");
                Error::not_found("Media not found")
            }
        })
}

async fn fetch_and_store(
    services: &Services,
    server: &ServerName,
    media_id: &str,
) -> Result<FileInfo> {
    let limit = services.media.max_upload_size();
    let path = format!(
        "/_matrix/federation/v1/media/download/{}",
        urlencoding(media_id)
    );
    let (headers, body) = services.federation.get_streamed(server, &path).await?;
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (part_headers, mut content) = split_multipart(content_type, body).await?;
    let header = |name: &str| {
        part_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut file_type = header("content-type");
    let disposition = header("content-disposition");
    if let Some(location) = header("location") {
        let (h, b) = services.federation.get_url_streamed(&location).await?;
        file_type = h
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        content = b;
    }
    let filename = disposition.as_deref().and_then(filename_of);
    services
        .media
        .store_remote(
            server,
            media_id,
            content,
            limit,
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

    #[tokio::test]
    async fn an_answer_sent_a_byte_at_a_time_reads_the_same() {
        use futures_util::StreamExt;
        let mut file = b"\r\n--almost-a-boundary\r\n".repeat(100);
        file.extend(std::iter::repeat_n(b'x', 40_000));
        let (ct, body) = multipart_body("text/plain", "inline", &file);
        let chunks: Vec<Result<bytes::Bytes>> = body
            .iter()
            .map(|b| Ok(bytes::Bytes::copy_from_slice(&[*b])))
            .collect();
        let (headers, mut content) =
            split_multipart(&ct, Box::pin(futures_util::stream::iter(chunks)))
                .await
                .expect("parses");
        assert!(headers.contains(&("content-type".to_owned(), "text/plain".to_owned())));
        let mut got = Vec::new();
        let mut pieces = 0;
        while let Some(chunk) = content.next().await {
            got.extend_from_slice(&chunk.expect("content"));
            pieces += 1;
        }
        assert_eq!(got, file);
        // Passed on in pieces of many bytes, not one by one.
        assert!(pieces < 10, "{pieces} pieces");
    }

    #[tokio::test]
    async fn multipart_round_trip() {
        let (ct, body) =
            multipart_body("image/png", "inline; filename=\"a.png\"", b"\x89PNG\r\n--x");
        let (headers, bytes) = parse_multipart(&ct, &body).await.expect("parses");
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
        assert!(parse_multipart("multipart/mixed", &body).await.is_err());
        // A boundary whose delimiter overlaps itself is an error, not a panic.
        assert!(parse_multipart("multipart/mixed; boundary=-", b"-----")
            .await
            .is_err());
        assert!(parse_multipart("multipart/mixed; boundary=-", b"---------")
            .await
            .is_err());
        assert!(parse_multipart(&ct, b"garbage").await.is_err());

        // A file holding the boundary all answers used to have reads back whole: every answer
        // has its own random boundary (`fuzz_our_answer_round_trips` cut such files short).
        let file = b"--hafen-media-8c3f2e1a9d\r\n--hafen-media-8c3f2e1a9d--\r\n";
        let (ct, body) = multipart_body("text/plain", "inline", file);
        assert_eq!(parse_multipart(&ct, &body).await.expect("parses").1, file);
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

    /// The streaming reader over an answer held in memory: it never has to wait, so it is
    /// driven to its end without a runtime.
    fn parse(content_type: &str, body: &[u8]) -> Result<Parsed> {
        use futures_util::FutureExt;
        parse_multipart(content_type, body)
            .now_or_never()
            .expect("an answer in memory is read without waiting")
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
