use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{assert_err, TestServer};

#[tokio::test]
async fn versions_lists_spec_versions() {
    let s = TestServer::start().await;
    let (status, body) = s
        .req(Method::GET, "/_matrix/client/versions", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let versions = body["versions"].as_array().expect("versions array");
    assert!(versions.contains(&json!("v1.19")), "{body}");
    assert!(versions.contains(&json!("v1.1")), "{body}");
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let s = TestServer::start().await;
    let res = s
        .http
        .request(
            Method::OPTIONS,
            format!("{}/_matrix/client/v3/login", s.base),
        )
        .header("Origin", "https://app.element.io")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    let methods = res.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }
    let res = s
        .http
        .get(format!("{}/_matrix/client/versions", s.base))
        .header("Origin", "https://app.element.io")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn unknown_endpoint_is_unrecognized() {
    let s = TestServer::start().await;
    let got = s
        .req(Method::GET, "/_matrix/client/v3/no_such_thing", None, None)
        .await;
    assert_err(&got, 404, "M_UNRECOGNIZED");
}

#[tokio::test]
async fn capabilities_need_a_token_and_list_room_versions() {
    let s = TestServer::start().await;
    let got = s
        .req(Method::GET, "/_matrix/client/v3/capabilities", None, None)
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let got = s
        .req(
            Method::GET,
            "/_matrix/client/v3/capabilities",
            Some("nope"),
            None,
        )
        .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    let alice = s.user("alice").await;
    let (status, body) = s.get("/_matrix/client/v3/capabilities", &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["capabilities"]["m.room_versions"]["default"],
        json!("12")
    );
    assert_eq!(
        body["capabilities"]["m.room_versions"]["available"]["1"],
        json!("stable")
    );
}

#[tokio::test]
async fn well_known_client_is_configurable() {
    let s = TestServer::start().await;
    let got = s
        .req(Method::GET, "/.well-known/matrix/client", None, None)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let s =
        TestServer::start_with(|c| c.well_known.client = Some("https://matrix.example.org".into()))
            .await;
    let (status, body) = s
        .req(Method::GET, "/.well-known/matrix/client", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["m.homeserver"]["base_url"],
        json!("https://matrix.example.org")
    );
}

#[tokio::test]
async fn oversized_body_is_too_large_and_not_json_is_not_json() {
    let s = TestServer::start_with(|c| c.max_request_size = 1024).await;
    let alice = s.user("alice").await;
    let big = "x".repeat(4096);
    let got = s
        .post(
            "/_matrix/client/v3/user/@alice:localhost/filter",
            &alice,
            json!({ "junk": big }),
        )
        .await;
    assert_err(&got, 413, "M_TOO_LARGE");
    let got = s
        .req_raw(Method::POST, "/_matrix/client/v3/login", None, b"{not json")
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    // The server keeps serving after bad input.
    let (status, _) = s
        .req(Method::GET, "/_matrix/client/versions", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn push_rules_are_the_server_defaults() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (status, body) = s.get("/_matrix/client/v3/pushrules/", &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let overrides = body["global"]["override"]
        .as_array()
        .expect("override rules");
    assert!(
        overrides
            .iter()
            .any(|r| r["rule_id"] == json!(".m.rule.master")),
        "{body}"
    );
    let got = s
        .req(Method::GET, "/_matrix/client/v3/pushrules/", None, None)
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
}

#[tokio::test]
async fn support_well_known_from_config() {
    let s = TestServer::start().await;
    let got = s
        .req(Method::GET, "/.well-known/matrix/support", None, None)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let s = TestServer::start_with(|c| {
        c.well_known.support_mxid = Some("@admin:localhost".into());
        c.well_known.support_email = Some("admin@example.org".into());
        c.well_known.support_page = Some("https://help.example.org".into());
    })
    .await;
    let (status, body) = s
        .req(Method::GET, "/.well-known/matrix/support", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "contacts": [{ "matrix_id": "@admin:localhost", "email_address": "admin@example.org",
                           "role": "m.role.admin" }],
            "support_page": "https://help.example.org",
        })
    );
}

#[tokio::test]
async fn server_well_known_delegates_when_configured() {
    let s = TestServer::start().await;
    let got = s
        .req(Method::GET, "/.well-known/matrix/server", None, None)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let s = TestServer::start_with(|c| {
        c.well_known.server = Some("matrix.example.org:443".into());
    })
    .await;
    let (status, body) = s
        .req(Method::GET, "/.well-known/matrix/server", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "m.server": "matrix.example.org:443" }));
}
