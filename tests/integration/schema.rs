//! Schema versions and migrations with a backup first (A10), and what version runs.

use std::{path::Path, process::Command};

use hafen::storage::{
    schema::{self, Migration, Prepared},
    Storage, Table,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{enc, unique_txn, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_hafen");

/// Whether the binary at [`BIN`] is the one built from this source (it knows `backup`, which
/// builds from before schema versions do not).
fn binary_is_this_build() -> bool {
    Command::new(BIN)
        .args(["backup", "--help"])
        .env_remove("HAFEN_CONFIG")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run the binary with `config` and `args`; whether it succeeded, and its stderr. A process
/// still running after 30 s (a binary that did not refuse and serves) is killed: a failure.
fn run_bin(config: &Path, args: &[&str]) -> (bool, String) {
    use std::io::Read;
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("HAFEN_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run hafen");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hafen {args:?} did not exit within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (status.success(), stderr)
}

fn open(path: &Path) -> Storage {
    Storage::open(path, 8, true).expect("open the stopped server's database")
}

fn forget_version(path: &Path) {
    let storage = open(path);
    let mut batch = storage.batch();
    batch
        .delete(Table::Global, b"schema_version")
        .expect("delete");
    batch.commit().expect("commit");
}

#[tokio::test]
async fn a_new_database_gets_the_current_version_and_an_old_one_is_backed_up_then_migrated() {
    let backups = tempfile::tempdir().expect("dir");
    let root = backups.path().to_path_buf();
    let mut s = TestServer::start_with(|c| c.backup_path = Some(root.clone())).await;
    let db = s.services().config.database_path.clone();
    assert_eq!(
        schema::stored_version(&s.services().storage).expect("read"),
        Some(schema::CURRENT)
    );
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let (status, _) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(&room),
                unique_txn()
            ),
            &alice,
            json!({ "msgtype": "m.text", "body": "from before versions" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // A database from before schema versions (version 0): backed up, then migrated.
    s.restart_after(|_| forget_version(&db)).await;
    assert_eq!(
        schema::stored_version(&s.services().storage).expect("read"),
        Some(schema::CURRENT)
    );
    let copies: Vec<_> = std::fs::read_dir(&root)
        .expect("backup dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    let copy = &copies[0];
    let name = copy
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(&format!("pre-migration-v0-to-v{}-", schema::CURRENT)),
        "{name}"
    );
    // The copy is the database as it was: version 0, the message in it.
    {
        let old = open(copy);
        assert_eq!(schema::stored_version(&old).expect("read"), None);
        assert!(old
            .scan_prefix(Table::Global, b"")
            .expect("scan")
            .next()
            .is_some());
    }
    let (status, msgs) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10",
                enc(&room)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{msgs}");
    assert!(msgs["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .any(|e| e["content"]["body"] == json!("from before versions")));

    // At the current version nothing more is copied.
    s.restart().await;
    assert_eq!(std::fs::read_dir(&root).expect("dir").count(), 1);
}

fn step_one(storage: &Storage) -> hafen::error::Result<()> {
    storage.put(Table::Global, b"test_step_1", b"done")
}

fn step_two(storage: &Storage) -> hafen::error::Result<()> {
    // Reads what the step before wrote: steps run in order.
    let first = storage.get(Table::Global, b"test_step_1")?;
    storage.put(Table::Global, b"test_step_2", &first.unwrap_or_default())
}

#[test]
fn migration_steps_run_in_order_after_a_checkpoint_next_to_the_database() {
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("db");
    let storage = open(&db);
    storage
        .put(Table::Global, b"counter", &[0; 8])
        .expect("put");
    schema::set_version(&storage, 1).expect("version");
    let steps = [
        Migration {
            from: 2,
            what: "second",
            run: step_two,
        },
        Migration {
            from: 1,
            what: "first",
            run: step_one,
        },
    ];
    // A gap in the steps: refused before anything is touched.
    let err = schema::migrate(&storage, &db, None, 4, &steps).expect_err("no step from 3");
    assert!(err.contains("no migration from schema version 3"), "{err}");
    assert_eq!(schema::stored_version(&storage).expect("read"), Some(1));
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);

    let done = schema::migrate(&storage, &db, None, 3, &steps).expect("migrates");
    let Prepared::Migrated { from, backup } = done else {
        panic!("not migrated: {done:?}");
    };
    assert_eq!(from, 1);
    // Without backup_path the copy is beside the database.
    assert_eq!(backup.parent(), Some(dir.path()));
    assert!(backup
        .file_name()
        .expect("name")
        .to_string_lossy()
        .starts_with("db.pre-migration-v1-to-v3-"));
    assert_eq!(schema::stored_version(&storage).expect("read"), Some(3));
    assert_eq!(
        storage.get(Table::Global, b"test_step_2").expect("get"),
        Some(b"done".to_vec())
    );
    let old = open(&backup);
    assert_eq!(schema::stored_version(&old).expect("read"), Some(1));
    assert_eq!(old.get(Table::Global, b"test_step_1").expect("get"), None);
    // Current now: nothing to do.
    assert_eq!(
        schema::migrate(&storage, &db, None, 3, &steps).expect("current"),
        Prepared::Current
    );
}

#[tokio::test]
async fn a_database_of_a_newer_version_refuses_to_start() {
    let mut s = TestServer::start().await;
    let alice = s.user("alice").await;
    let config = s.services().config.clone();
    let newer = schema::CURRENT + 1;
    s.running
        .take()
        .expect("running")
        .stop()
        .await
        .expect("stop");
    {
        let storage = open(&config.database_path);
        schema::set_version(&storage, newer).expect("set");
    }
    let err = match hafen::server::start(config.clone()).await {
        Ok(_) => panic!("a newer database was opened"),
        Err(e) => e,
    };
    assert!(err.contains(&format!("schema version {newer}")), "{err}");
    assert!(err.contains("newer"), "{err}");

    // The real binary: a non-zero exit with the message, the database untouched.
    let cfg = config
        .database_path
        .parent()
        .expect("dir")
        .join("newer.toml");
    std::fs::write(
        &cfg,
        format!(
            "[global]\nport = 0\ndatabase_path = \"{}\"\nlog = \"warn\"\n",
            config.database_path.display()
        ),
    )
    .expect("config");
    if binary_is_this_build() {
        let (ok, stderr) = run_bin(&cfg, &["serve"]);
        assert!(!ok, "started on a newer database");
        assert!(
            stderr.contains(&format!("schema version {newer}")),
            "{stderr}"
        );
        // Admin commands refuse too.
        let (ok, stderr) = run_bin(&cfg, &["token", "list"]);
        assert!(!ok, "an admin command opened a newer database: {stderr}");
    } else {
        // The target directory is shared by several checkouts: `target/debug/hafen` is whichever
        // was built last. The refusal was checked in-process above; the binary's turn comes
        // when it is this build again.
        eprintln!("note: {BIN} is another build; its exit on a newer database is not checked");
    }
    let storage = open(&config.database_path);
    assert_eq!(schema::stored_version(&storage).expect("read"), Some(newer));
    assert!(
        std::fs::read_dir(config.database_path.parent().expect("dir"))
            .expect("dir")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("pre-migration"))
    );
    drop(alice);
}

#[tokio::test]
async fn the_version_is_the_same_everywhere() {
    let out = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run hafen");
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(printed, format!("hafen {}", hafen::VERSION));
    assert!(hafen::VERSION.starts_with(env!("CARGO_PKG_VERSION")));

    let s = TestServer::start().await;
    let get = |path: &'static str| {
        let s = &s;
        async move {
            let res = s
                .http
                .get(format!("{}{path}", s.base))
                .send()
                .await
                .expect("request");
            let status = res.status();
            (status, res.json::<Value>().await.expect("json"))
        }
    };
    let (status, body) = get("/_matrix/client/versions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["server"],
        json!({ "name": "hafen", "version": hafen::VERSION })
    );
    let (status, body) = get("/_matrix/federation/v1/version").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "server": { "name": "hafen", "version": hafen::VERSION } })
    );
}

#[tokio::test]
async fn a_version_1_database_gets_its_state_indexed_by_key_and_reads_the_state_at_events() {
    let mut s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let topic = |t: &'static str| {
        let (s, room, alice) = (&s, room.clone(), alice.clone());
        async move {
            let (status, body) = s
                .put(
                    &format!(
                        "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                        enc(&room)
                    ),
                    &alice,
                    json!({ "topic": t }),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    topic("first").await;
    let (status, sent) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(&room),
                unique_txn()
            ),
            &alice,
            json!({ "msgtype": "m.text", "body": "between the topics" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let message = sent["event_id"].as_str().expect("event id").to_owned();
    topic("second").await;
    s.join(&bob, &room).await;

    // A database of schema version 1 has no per-key state log: the migration builds it.
    s.restart_after(|c| {
        let storage = open(&c.database_path);
        let mut batch = storage.batch();
        let mut rows = 0;
        for entry in storage.scan_prefix(Table::StateByKey, b"").expect("scan") {
            let (k, _) = entry.expect("row");
            batch.delete(Table::StateByKey, &k).expect("delete");
            rows += 1;
        }
        assert!(rows > 5, "the room's state changes were indexed ({rows})");
        batch.commit().expect("commit");
        schema::set_version(&storage, 1).expect("version");
    })
    .await;
    assert_eq!(
        schema::stored_version(&s.services().storage).expect("read"),
        Some(schema::CURRENT)
    );

    // The state at the message, read from the rebuilt index: the first topic, alice alone.
    let (status, ctx) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/context/{}?limit=0",
                enc(&room),
                enc(&message)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    let state = ctx["state"].as_array().expect("state");
    let topics: Vec<&Value> = state
        .iter()
        .filter(|e| e["type"] == "m.room.topic")
        .map(|e| &e["content"]["topic"])
        .collect();
    assert_eq!(topics, vec![&json!("first")], "{ctx}");
    let members: Vec<&str> = state
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    assert_eq!(members, vec![alice.user_id.as_str()], "{ctx}");

    let end = ctx["end"].as_str().expect("end token");
    let (status, at) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/members?at={}",
                enc(&room),
                enc(end)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{at}");
    let at_members: Vec<&str> = at["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    assert_eq!(at_members, vec![alice.user_id.as_str()], "{at}");

    // And now: both, the second topic.
    let (status, now) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/members", enc(&room)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(now["chunk"].as_array().map(Vec::len), Some(2), "{now}");
}
