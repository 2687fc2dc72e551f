//! HTTP: the router, CORS, fallbacks. Handlers live in `client/` by spec area and stay thin:
//! parse (ruma), call a service, map the result.

pub mod client;
pub mod federation;
pub mod forwarded;
pub mod ruma_wrapper;
pub mod tls;

use std::sync::Arc;

use axum::{response::Response, Router};
use http::{header, HeaderValue, Method, StatusCode};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    error::{ErrCode, Error},
    service::Services,
};

/// The complete router of the server.
pub fn router(services: Arc<Services>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::HeaderName::from_static("x-requested-with"),
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
        ]);
    let proxies = Arc::new(forwarded::TrustedProxies::new(
        &services.config.trusted_proxies,
    ));
    federation::routes(client::routes(Router::new()))
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            proxies,
            request_context,
        ))
        .layer(cors)
        .with_state(services)
}

/// The client's address of a request: its TCP peer, or behind a trusted proxy the address the
/// proxy names (`forwarded`). Set by [`request_context`] for every request; everything that
/// wants the client's address (rate limits, the audit log, devices' last seen) reads this or
/// `RequestCtx`, never the connection's peer.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

/// The client's address as [`request_context`] found it.
pub fn client_addr(extensions: &http::Extensions) -> Option<std::net::IpAddr> {
    extensions.get::<ClientAddr>().and_then(|c| c.0)
}

/// Every request runs with its client's address and user agent at hand for the audit log
/// (`policy::audit::RequestCtx`), whichever service writes the entry, and with the address as
/// a [`ClientAddr`] extension for the extractors.
async fn request_context(
    axum::extract::State(proxies): axum::extract::State<Arc<forwarded::TrustedProxies>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| proxies.client_ip(c.0.ip(), req.headers()));
    req.extensions_mut().insert(ClientAddr(ip));
    let ctx = crate::policy::audit::RequestCtx::from_parts(req.headers(), ip);
    ctx.scope(next.run(req)).await
}

async fn unrecognized() -> Error {
    Error::new(ErrCode::Unrecognized, "Unrecognized request")
}

async fn method_not_allowed() -> Error {
    Error::with_status(
        ErrCode::Unrecognized,
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
    )
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut res = Response::new(axum::body::Body::from(bytes));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Serve until `shutdown` resolves. Returns the bound address through `on_bound` first.
pub async fn serve(
    services: Arc<Services>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(services);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
