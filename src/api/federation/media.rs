//! Authenticated media for other servers: `GET /media/download/{mediaId}` and
//! `/media/thumbnail/{mediaId}`, answered as `multipart/mixed` (metadata, then the content).

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use super::Signed;
use crate::{
    api::client::{media::timeout, query_param},
    error::{ErrCode, Error, Result},
    service::{federation::media::multipart_body, media::thumbnail::Method, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/federation/v1/media/download/{media_id}",
        get(download),
    )
    .route(
        "/_matrix/federation/v1/media/thumbnail/{media_id}",
        get(thumbnail),
    )
}

fn multipart(content_type: &str, disposition: &str, bytes: &[u8]) -> Response {
    let (ct, body) = multipart_body(content_type, disposition, bytes);
    let mut res = (StatusCode::OK, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&ct) {
        res.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    res
}

async fn download(
    State(s): State<Arc<Services>>,
    Path(media_id): Path<String>,
    RawQuery(q): RawQuery,
    _signed: Signed,
) -> Result<Response> {
    let own = s.globals.server_name.to_string();
    let file = s.media.file(&own, &media_id, timeout(&q)?).await?;
    let bytes = s.media.files().read(&file.sha256).await?;
    let content_type = file
        .content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let disposition = match &file.filename {
        Some(name) => format!(
            "attachment; filename=\"{}\"",
            name.replace(['"', '\\'], "_")
        ),
        None => "attachment".to_owned(),
    };
    Ok(multipart(&content_type, &disposition, &bytes))
}

async fn thumbnail(
    State(s): State<Arc<Services>>,
    Path(media_id): Path<String>,
    RawQuery(q): RawQuery,
    _signed: Signed,
) -> Result<Response> {
    let dimension = |key: &str| -> Result<u32> {
        query_param(&q, key)?
            .ok_or_else(|| Error::new(ErrCode::MissingParam, format!("{key} is required")))?
            .parse::<u32>()
            .map_err(|_| Error::invalid_param(format!("{key} must be a positive integer")))
    };
    let (width, height) = (dimension("width")?, dimension("height")?);
    let method = Method::parse(query_param(&q, "method")?.as_deref())?;
    let own = s.globals.server_name.to_string();
    let thumb = s
        .media
        .thumbnail(&own, &media_id, width, height, method, timeout(&q)?)
        .await?;
    let bytes = s.media.files().read(&thumb.sha256).await?;
    Ok(multipart(&thumb.content_type, "inline", &bytes))
}
