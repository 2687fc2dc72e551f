//! Crash safety and the CLI: the real `hafen` binary takes messages, is killed with SIGKILL
//! mid-load, restarts on the same data directory, and still has every message it acknowledged.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::common::enc;

const BIN: &str = env!("CARGO_BIN_EXE_hafen");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("conduit-config.toml");
    std::fs::write(
        &path,
        format!(
            "[global]\nserver_name = \"localhost\"\nport = {port}\ndatabase_path = \"{}\"\nlog = \"warn\"\n\
             [global.rate_limits]\nenabled = false\n",
            dir.join("db").display()
        ),
    )
    .unwrap();
    path
}

fn hafen(config: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(config);
    c.env_remove("HAFEN_CONFIG");
    c
}

async fn wait_ready(base: &str, child: &mut Child) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early: {status}");
        }
        if let Ok(r) = http
            .get(format!("{base}/_matrix/client/versions"))
            .send()
            .await
        {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn login(http: &reqwest::Client, base: &str) -> String {
    let res = http
        .post(format!("{base}/_matrix/client/v3/login"))
        .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "hunter2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn cli_creates_users_and_refuses_a_held_database() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2\n").unwrap();

    let out = hafen(&config)
        .args(["user", "create", "alice", "--admin", "--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "created @alice:localhost (admin)"
    );

    let out = hafen(&config)
        .args(["token", "create", "--uses", "2", "--expires", "1d"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(token.len(), 16, "{token}");

    let mut server = hafen(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base, &mut server).await;

    // The database is held: admin commands refuse with a clear message.
    let out = hafen(&config)
        .args(["user", "create", "bob", "--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");

    // The user made by the CLI logs in.
    let http = reqwest::Client::new();
    let token = login(&http, &base).await;
    let res = http
        .get(format!("{base}/_matrix/client/v3/account/whoami"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["user_id"], "@alice:localhost");
    server.kill().unwrap();
    server.wait().unwrap();

    // Invalid config: clear message, non-zero exit.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[global]\nport = \"eighty\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("port"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Unknown key: a warning naming it, and the server still starts.
    let odd = dir.path().join("odd.toml");
    std::fs::write(
        &odd,
        format!(
            "[global]\nport = {}\ndatabase_path = \"{}\"\nfrobnicate = 1\n",
            free_port(),
            dir.path().join("db2").display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&odd)
        .args(["token", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("frobnicate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn sigkill_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2").unwrap();
    let out = hafen(&config)
        .args(["user", "create", "alice", "--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let base = format!("http://127.0.0.1:{port}");
    let mut server = hafen(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&base, &mut server).await;
    let http = reqwest::Client::new();
    let token = login(&http, &base).await;
    let res = http
        .post(format!("{base}/_matrix/client/v3/createRoom"))
        .bearer_auth(&token)
        .json(&json!({"name": "durable"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let room_id = res.json::<Value>().await.unwrap()["room_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Four senders in parallel; the server is killed while they are sending.
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let mut senders = Vec::new();
    for s in 0..4 {
        let (http, base, token, room_id, acked) = (
            http.clone(),
            base.clone(),
            token.clone(),
            room_id.clone(),
            acked.clone(),
        );
        senders.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let url = format!(
                    "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/t{s}-{i}",
                    enc(&room_id)
                );
                let res = http
                    .put(url)
                    .bearer_auth(&token)
                    .json(&json!({"msgtype": "m.text", "body": format!("{s}-{i}")}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        if let Some(id) = v["event_id"].as_str() {
                            acked.lock().push(id.to_owned());
                        }
                    }
                    _ => break,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().len() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().clone();
    assert!(acked.len() >= 200, "only {} acknowledged", acked.len());

    // Restart on the same data: every acknowledged event is there.
    let mut server = hafen(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&base, &mut server).await;
    let token = login(&http, &base).await;
    let mut found = std::collections::HashSet::new();
    let mut from: Option<String> = None;
    for _ in 0..1000 {
        let mut url = format!(
            "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=500",
            enc(&room_id)
        );
        if let Some(f) = &from {
            url.push_str(&format!("&from={}", enc(f)));
        }
        let res = http.get(url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        for e in v["chunk"].as_array().unwrap() {
            found.insert(e["event_id"].as_str().unwrap().to_owned());
        }
        match v["end"].as_str() {
            Some(end) if !v["chunk"].as_array().unwrap().is_empty() => from = Some(end.to_owned()),
            _ => break,
        }
    }
    let missing: Vec<_> = acked.iter().filter(|id| !found.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    // And the room still takes new messages.
    let res = http
        .put(format!(
            "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/after",
            enc(&room_id)
        ))
        .bearer_auth(&token)
        .json(&json!({"msgtype": "m.text", "body": "after restart"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    server.kill().unwrap();
    server.wait().unwrap();
}
