//! Synapse's admin API for a user's media, at Synapse's paths with Synapse's shapes (admin
//! tools such as synapse-admin work unchanged); server admins only, every call audited:
//!
//! - `GET /_synapse/admin/v1/users/{userId}/media`: the media the user uploaded, paginated
//!   (`from`, `limit`, `order_by`, `dir`), with `total` and `next_token`;
//! - `DELETE /_synapse/admin/v1/users/{userId}/media`: deletes the same page;
//! - `DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}`: one local media item.
//!
//! Deleting removes the rows and, once no other media id uses it, the file and its thumbnails,
//! then compacts the media tables so the metadata (file names) is gone from disk too.

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, State},
    routing::{delete, get},
    Json, Router,
};
use ruma::ServerName;
use serde_json::{json, Value};

use super::{
    account::{query_param, uint_param},
    admin_api::{known_user, local_user, require_admin, SortKey},
};
use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    service::{media::erase::UserMedia, Services},
    storage::Table,
};

/// Synapse's default and our largest page.
const PAGE: usize = 100;
const PAGE_MAX: usize = 1000;
const ORDER: &[&str] = &[
    "media_id",
    "upload_name",
    "created_ts",
    "last_access_ts",
    "media_length",
    "media_type",
    "quarantined_by",
    "safe_from_quarantine",
];

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_synapse/admin/v1/users/{user_id}/media",
        get(list_user_media).delete(delete_user_media),
    )
    .route(
        "/_synapse/admin/v1/media/{server_name}/{media_id}",
        delete(delete_one),
    )
}

/// One item as Synapse's media list shows it.
fn media_json(m: &UserMedia) -> Value {
    let file = m.record.file.as_ref();
    json!({
        "media_id": m.media_id,
        "media_type": file.and_then(|f| f.content_type.clone()),
        "media_length": file.map(|f| f.size),
        "upload_name": file.and_then(|f| f.filename.clone()),
        "created_ts": m.record.created_ts,
        // Hafen does not record reads (it would be one write per download).
        "last_access_ts": Value::Null,
        "quarantined_by": Value::Null,
        "safe_from_quarantine": false,
    })
}

/// The page of `user`'s media the query selects, and how many there are in all.
fn page(
    s: &Services,
    user: &ruma::UserId,
    q: &Option<String>,
) -> Result<(Vec<UserMedia>, usize, usize)> {
    let from = uint_param(q, "from", 0)?;
    let limit = uint_param(q, "limit", PAGE)?.min(PAGE_MAX);
    let order_by = query_param(q, "order_by")?.unwrap_or_else(|| "created_ts".to_owned());
    if !ORDER.contains(&order_by.as_str()) {
        return Err(Error::invalid_param(format!(
            "Unknown value for order_by: {order_by}"
        )));
    }
    let backwards = match query_param(q, "dir")?.as_deref() {
        None | Some("f") => false,
        Some("b") => true,
        Some(_) => {
            return Err(Error::invalid_param(
                "Unknown direction: dir must be f or b",
            ))
        }
    };
    // Only this server's media: what the user uploaded here.
    let mut media: Vec<(SortKey, UserMedia)> = s
        .media
        .user_media(user.as_str())?
        .into_iter()
        .filter(|m| m.server == s.globals.server_name.as_str())
        .map(|m| {
            let file = m.record.file.as_ref();
            let key = match order_by.as_str() {
                "media_id" => SortKey::Text(m.media_id.clone()),
                "upload_name" => {
                    SortKey::Text(file.and_then(|f| f.filename.clone()).unwrap_or_default())
                }
                "media_type" => SortKey::Text(
                    file.and_then(|f| f.content_type.clone())
                        .unwrap_or_default(),
                ),
                "media_length" => SortKey::Num(file.map_or(0, |f| f.size)),
                // Never accessed, never quarantined: every item sorts the same.
                "last_access_ts" | "quarantined_by" | "safe_from_quarantine" => SortKey::Num(0),
                _ => SortKey::Num(m.record.created_ts),
            };
            (key, m)
        })
        .collect();
    // By the column in `dir`, then by media id (a stable order across pages).
    media.sort_by(|a, b| {
        let first = if backwards {
            b.0.cmp(&a.0)
        } else {
            a.0.cmp(&b.0)
        };
        first.then_with(|| a.1.media_id.cmp(&b.1.media_id))
    });
    let total = media.len();
    let selected = media
        .into_iter()
        .skip(from)
        .take(limit)
        .map(|(_, m)| m)
        .collect();
    Ok((selected, total, from))
}

/// The admin check (audited with the method), the local user from the path, and the page of
/// their media the query selects.
fn user_page(
    s: &Services,
    who: &crate::service::accounts::Identity,
    method: &str,
    user_id: &str,
    q: &Option<String>,
) -> Result<(Vec<UserMedia>, usize, usize)> {
    require_admin(
        s,
        who,
        &format!("{method} /_synapse/admin/v1/users/{{userId}}/media"),
        Some(user_id),
    )?;
    let user = local_user(s, user_id)?;
    known_user(s, &user)?;
    page(s, &user, q)
}

async fn list_user_media(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(user_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let (media, total, from) = user_page(&s, &who, "GET", &user_id, &q)?;
    let mut body = json!({
        "media": media.iter().map(media_json).collect::<Vec<_>>(),
        "total": total,
    });
    if from + media.len() < total {
        body["next_token"] = json!(from + media.len());
    }
    Ok(Json(body))
}

/// Delete media ids of this server, then make it physical.
async fn delete_local(s: &Services, ids: &[String]) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for id in ids {
        if s.media.delete_media(&s.globals.server_name, id).await? {
            deleted.push(id.clone());
        }
    }
    if !deleted.is_empty() {
        let storage = s.storage.clone();
        tokio::task::spawn_blocking(move || {
            storage.erase_deleted(&[
                Table::Media,
                Table::MediaByUser,
                Table::MediaPending,
                Table::MediaFileRefs,
            ])
        })
        .await
        .map_err(Error::internal)??;
    }
    Ok(deleted)
}

async fn delete_user_media(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(user_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let (media, _, _) = user_page(&s, &who, "DELETE", &user_id, &q)?;
    let ids: Vec<String> = media.into_iter().map(|m| m.media_id).collect();
    let deleted = delete_local(&s, &ids).await?;
    Ok(Json(
        json!({ "total": deleted.len(), "deleted_media": deleted }),
    ))
}

async fn delete_one(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((server_name, media_id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let target = format!("mxc://{server_name}/{media_id}");
    require_admin(
        &s,
        &who,
        "DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}",
        Some(&target),
    )?;
    let server = <&ServerName>::try_from(server_name.as_str())
        .map_err(|_| Error::invalid_param("Not a server name"))?;
    if server != s.globals.server_name {
        return Err(Error::bad_request("Can only delete local media"));
    }
    let deleted = delete_local(&s, &[media_id]).await?;
    if deleted.is_empty() {
        return Err(Error::not_found("Unknown media"));
    }
    Ok(Json(
        json!({ "total": deleted.len(), "deleted_media": deleted }),
    ))
}
