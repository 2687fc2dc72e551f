//! Transparency (REQUIREMENTS.md A1): what the server stores, why, for how long and who
//! receives it, generated from the live config; and the privacy notice asked again when the
//! operator publishes a new version (403 `M_CONSENT_NOT_GIVEN`, the consent page, the API).

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer};

const V3: &str = "/_matrix/client/v3";

fn category<'a>(statement: &'a Value, id: &str) -> &'a Value {
    statement["categories"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == json!(id)))
        .unwrap_or_else(|| panic!("no category {id} in {statement}"))
}

#[tokio::test]
async fn the_privacy_statement_follows_the_live_config() {
    // Defaults: federation off, no retention, audit IPs truncated, presence off.
    let s = TestServer::start().await;
    let (status, body) = s
        .req(Method::GET, "/_hafen/client/v1/privacy", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["server_name"], json!("localhost"));
    assert_eq!(body["privacy_notice"], Value::Null);
    let messages = category(&body, "messages");
    assert!(messages["kept_for"]
        .as_str()
        .expect("kept_for")
        .starts_with("until deleted"));
    assert!(messages["recipients"]
        .as_str()
        .expect("recipients")
        .contains("federation with other servers is off"));
    let audit = category(&body, "audit_log");
    assert!(audit["data"].as_str().expect("data").contains("shortened"));
    assert_eq!(audit["kept_for"], json!("180 days"));
    assert!(category(&body, "presence")["data"]
        .as_str()
        .expect("data")
        .starts_with("nothing"));
    assert!(body["rights"].as_array().expect("rights").iter().any(|r| r
        .as_str()
        .unwrap_or_default()
        .contains("/_hafen/client/v1/export")));
    s.stop().await;

    // Retention, partner federation, media lifetimes, audit retention and presence change it.
    let s = TestServer::start_with(|c| {
        c.retention.default_max_lifetime = Some(30 * 86_400_000);
        c.retention.allowed_max = Some(365 * 86_400_000);
        c.allow_federation = true;
        c.federation_allowlist = vec!["partner.example".into()];
        c.media_retention.local_max_lifetime = Some(7 * 86_400_000);
        c.audit_retention_days = 14;
        c.audit_ip_mode = hafen::policy::audit::IpMode::Hash;
        c.allow_presence = true;
        c.privacy_notice = Some(hafen::config::PrivacyNotice {
            url: "https://example.org/privacy".into(),
            version: "3".into(),
            name: Some("Datenschutzhinweise <2026>".into()),
            block_until_accepted: true,
        });
    })
    .await;
    let (status, body) = s
        .req(Method::GET, "/_hafen/client/v1/privacy", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let messages = category(&body, "messages");
    assert!(
        messages["kept_for"]
            .as_str()
            .expect("kept_for")
            .starts_with("30 days in rooms without their own retention policy"),
        "{messages}"
    );
    assert!(messages["kept_for"]
        .as_str()
        .expect("kept_for")
        .contains("no room keeps them longer than 365 days"));
    assert!(messages["recipients"]
        .as_str()
        .expect("recipients")
        .contains("only among these partners: partner.example"));
    assert!(category(&body, "media")["kept_for"]
        .as_str()
        .expect("kept_for")
        .starts_with("your uploads: 7 days after the upload"));
    let audit = category(&body, "audit_log");
    assert_eq!(audit["kept_for"], json!("14 days"));
    assert!(audit["data"].as_str().expect("data").contains("keyed hash"));
    assert!(category(&body, "presence")["data"]
        .as_str()
        .expect("data")
        .starts_with("whether you are online"));
    assert_eq!(
        body["privacy_notice"],
        json!({ "name": "Datenschutzhinweise <2026>", "url": "https://example.org/privacy", "version": "3" })
    );

    // The same as a web page, escaped.
    let page = reqwest::get(format!("{}/_hafen/privacy", s.base))
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(
        page.headers()["content-type"].to_str().expect("type"),
        "text/html; charset=utf-8"
    );
    let html = page.text().await.expect("html");
    assert!(html.contains("Datenschutzhinweise &lt;2026&gt;"), "{html}");
    assert!(!html.contains("<2026>"));
    assert!(html.contains("<tr id=\"audit_log\">"));
    assert!(html.contains("14 days"));
    s.stop().await;
}

fn notice(version: &str) -> hafen::config::PrivacyNotice {
    hafen::config::PrivacyNotice {
        url: "https://example.org/privacy".into(),
        version: version.into(),
        name: None,
        block_until_accepted: true,
    }
}

#[tokio::test]
async fn a_new_privacy_notice_version_is_asked_again() {
    let mut s = TestServer::start_with(|c| c.privacy_notice = Some(notice("1"))).await;
    let alice = s.user("alice").await;
    // Accepted version 1 (as at registration).
    let (status, body) = s
        .post(
            "/_hafen/client/v1/privacy_notice/accept",
            &alice,
            json!({ "version": "1" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({}));
    let room = s.create_room(&alice, json!({})).await;
    s.halt().await;

    // The operator publishes version 2: alice is asked again before she acts.
    s.resume_with(|c| {
        c.privacy_notice = Some(notice("2"));
        c.well_known.client = Some("https://matrix.example.org".into());
    })
    .await;
    let send = |txn: &str| format!("{V3}/rooms/{}/send/m.room.message/{txn}", enc(&room));
    let got = s
        .put(
            &send("t1"),
            &alice,
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_err(&got, 403, "M_CONSENT_NOT_GIVEN");
    let uri = got.1["consent_uri"]
        .as_str()
        .expect("consent_uri")
        .to_owned();
    assert!(
        uri.starts_with("https://matrix.example.org/_hafen/consent?u=%40alice%3Alocalhost&h="),
        "{uri}"
    );
    assert!(got.1["error"].as_str().expect("error").contains(&uri));
    // Reading goes on; leaving too; creating rooms and profile changes wait.
    let (status, _) = s.get(&format!("{V3}/sync?timeout=0"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_err(
        &s.post(&format!("{V3}/createRoom"), &alice, json!({})).await,
        403,
        "M_CONSENT_NOT_GIVEN",
    );
    assert_err(
        &s.put(
            &format!("{V3}/profile/{}/displayname", enc(&alice.user_id)),
            &alice,
            json!({ "displayname": "A" }),
        )
        .await,
        403,
        "M_CONSENT_NOT_GIVEN",
    );

    // The consent page: the link works only as signed for alice.
    let path_and_query = uri
        .strip_prefix("https://matrix.example.org")
        .expect("our base");
    let http = reqwest::Client::new();
    let page = http
        .get(format!("{}{path_and_query}", s.base))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.expect("html");
    assert!(html.contains("https://example.org/privacy"), "{html}");
    assert!(html.contains("version 2"));
    let h = uri.split("&h=").nth(1).expect("h").to_owned();
    let forged = http
        .get(format!(
            "{}/_hafen/consent?u=%40bob%3Alocalhost&h={h}",
            s.base
        ))
        .send()
        .await
        .expect("page");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let form = |u: &str, h: &str, v: &str| {
        http.post(format!("{}/_hafen/consent", s.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("u={}&h={h}&v={v}", enc(u)))
            .send()
    };
    // A forged code and an old version are refused; nothing is recorded.
    assert_eq!(
        form(&alice.user_id, "00", "2")
            .await
            .expect("post")
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        form(&alice.user_id, &h, "1").await.expect("post").status(),
        StatusCode::CONFLICT
    );
    assert_err(
        &s.put(
            &send("t2"),
            &alice,
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await,
        403,
        "M_CONSENT_NOT_GIVEN",
    );
    let done = form(&alice.user_id, &h, "2").await.expect("post");
    assert_eq!(done.status(), StatusCode::OK);
    assert!(done.text().await.expect("html").contains("Thank you"));
    let got = s
        .put(
            &send("t3"),
            &alice,
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert!(got.1["event_id"].is_string());
    let accepted = s
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| {
            e.kind == "privacy_notice_accepted"
        })
        .expect("audit")
        .0;
    let versions: Vec<&Value> = accepted.iter().map(|e| &e.detail["version"]).collect();
    assert_eq!(versions, vec![&json!("1"), &json!("2")]);

    // The API: a wrong version is 400 M_INVALID_PARAM, a missing one 400 M_BAD_JSON.
    let bob = s.user("bob").await;
    assert_err(
        &s.post(
            "/_hafen/client/v1/privacy_notice/accept",
            &bob,
            json!({ "version": "1" }),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post("/_hafen/client/v1/privacy_notice/accept", &bob, json!({}))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req(
            Method::POST,
            "/_hafen/client/v1/privacy_notice/accept",
            None,
            Some(json!({ "version": "2" })),
        )
        .await,
        401,
        "M_MISSING_TOKEN",
    );
    s.halt().await;

    // block_until_accepted = false: nobody is blocked.
    s.resume_with(|c| {
        let mut n = notice("3");
        n.block_until_accepted = false;
        c.privacy_notice = Some(n);
    })
    .await;
    let got = s
        .put(
            &send("t4"),
            &alice,
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    // A link made for version 2 does not accept version 3.
    let old_link = reqwest::Client::new()
        .get(format!("{}{path_and_query}", s.base))
        .send()
        .await
        .expect("page");
    assert_eq!(old_link.status(), StatusCode::FORBIDDEN);
    s.stop().await;
}
