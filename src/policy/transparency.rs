//! What this server stores about its users, why, for how long and who receives it
//! (REQUIREMENTS.md A1), generated from the live configuration so that it can never say more or
//! less than the server does. Served without a token (it must be readable before registering) as
//! JSON at `GET /_hafen/client/v1/privacy` and as a web page at `GET /_hafen/privacy`.
//!
//! Each entry is one category of data. `kept_for` is computed from the settings that decide
//! it (retention, media retention, audit retention, token lifetimes); `recipients` says who
//! besides this server gets the data, again from the settings (federation, push, TURN).

use serde::Serialize;

use crate::config::Config;

/// One category of personal data.
#[derive(Debug, Clone, Serialize)]
pub struct Category {
    /// A stable identifier (`account`, `messages`, ...).
    pub id: &'static str,
    pub data: String,
    pub purpose: String,
    pub kept_for: String,
    pub recipients: String,
    /// The settings that decide this entry (names in conduit-config.toml).
    pub settings: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    pub server_name: String,
    /// The operator's own notice, when configured.
    pub privacy_notice: Option<NoticeRef>,
    pub categories: Vec<Category>,
    /// How users exercise their rights on this server.
    pub rights: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NoticeRef {
    pub name: String,
    pub url: String,
    pub version: String,
}

/// "3 days", "12 hours", "90 minutes", "500 ms": the largest whole unit.
pub fn human_duration(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "day"),
        (3_600_000, "hour"),
        (60_000, "minute"),
        (1_000, "second"),
    ];
    for (size, name) in UNITS {
        if ms >= size && ms.is_multiple_of(size) {
            let n = ms / size;
            return format!("{n} {name}{}", if n == 1 { "" } else { "s" });
        }
    }
    match UNITS.iter().find(|(size, _)| ms >= *size) {
        Some((size, name)) => {
            let n = ms / size;
            format!("about {n} {name}{}", if n == 1 { "" } else { "s" })
        }
        None => format!("{ms} ms"),
    }
}

fn federation_recipients(config: &Config) -> String {
    if !config.allow_federation {
        return "nobody: federation with other servers is off".into();
    }
    let mut s = if config.federation_allowlist.is_empty() {
        "the servers of the other members of the rooms you are in (federation is open to any server"
            .to_owned()
    } else {
        format!(
            "the servers of the other members of the rooms you are in, only among these partners: {}",
            config.federation_allowlist.join(", ")
        )
    };
    if config.federation_allowlist.is_empty() {
        if config.federation_denylist.is_empty() {
            s.push(')');
        } else {
            s.push_str(&format!(
                " except {})",
                config.federation_denylist.join(", ")
            ));
        }
    }
    s
}

fn message_lifetime(config: &Config) -> String {
    let r = &config.retention;
    let bound = |s: &mut String| {
        match (r.allowed_min, r.allowed_max) {
            (Some(min), Some(max)) => s.push_str(&format!(
                "; a room's own policy is kept between {} and {}",
                human_duration(min),
                human_duration(max)
            )),
            (Some(min), None) => s.push_str(&format!(
                "; a room's own policy keeps them at least {}",
                human_duration(min)
            )),
            (None, Some(max)) => s.push_str(&format!(
                "; no room keeps them longer than {}",
                human_duration(max)
            )),
            (None, None) => {}
        };
    };
    let mut s = match r.default_max_lifetime.or(r.allowed_max) {
        Some(ms) => format!(
            "{} in rooms without their own retention policy (m.room.retention)",
            human_duration(ms)
        ),
        None => "until deleted (redaction, room deletion, account erasure), or as long as the room's retention policy (m.room.retention) says".into(),
    };
    bound(&mut s);
    s.push_str("; state events (names, memberships, permissions) stay as long as the room exists");
    s
}

/// The statement for this configuration.
pub fn statement(config: &Config) -> Statement {
    let mut categories = Vec::new();
    categories.push(Category {
        id: "account",
        data: "your user id, password (as an argon2 hash only), display name and avatar, account settings (account data), the version of the privacy notice you accepted and when".into(),
        purpose: "to provide your account and show your name to the people you talk to".into(),
        kept_for: "until your account is deactivated; deactivation with erasure removes profile, settings and keys".into(),
        recipients: format!("display name and avatar: the people you share rooms with; {}", federation_recipients(config)),
        settings: vec!["allow_registration", "registration_token"],
    });
    categories.push(Category {
        id: "devices",
        data: "your devices (sessions): id, name, access and refresh tokens (as hashes), the last address and time each was used".into(),
        purpose: "to let your devices sign in, and to let you and the admins see and end sessions".into(),
        kept_for: format!(
            "until you log the device out; access tokens that come with a refresh token expire after {}",
            human_duration(config.access_token_lifetime_secs.saturating_mul(1000))
        ),
        recipients: "device ids and public device names: the people you share encrypted rooms with (for end-to-end encryption)".into(),
        settings: vec!["access_token_lifetime_secs", "max_devices_per_user"],
    });
    categories.push(Category {
        id: "messages",
        data: "the messages and files you send, room state you set (names, topics, memberships), reactions, read receipts, and, in encrypted rooms, only the encrypted messages".into(),
        purpose: "to deliver your messages to the rooms you are in and keep their history".into(),
        kept_for: message_lifetime(config),
        recipients: format!("the members of the room; {}", federation_recipients(config)),
        settings: vec!["retention.default_max_lifetime", "retention.allowed_min", "retention.allowed_max", "retention.purge_interval"],
    });
    let media_kept = match config.media_retention.local_max_lifetime {
        Some(ms) => format!("{} after the upload", human_duration(ms)),
        None => "until deleted (by you, an admin, or account erasure)".into(),
    };
    let remote_kept = match config.media_retention.remote_max_lifetime {
        Some(ms) => format!("{} after it was fetched", human_duration(ms)),
        None => "until an admin deletes it".into(),
    };
    categories.push(Category {
        id: "media",
        data: "files and images you upload, and copies of other servers' files shown to you".into(),
        purpose: "to deliver files in rooms and show previews (thumbnails)".into(),
        kept_for: format!(
            "your uploads: {media_kept}; copies of other servers' files: {remote_kept}"
        ),
        recipients: format!(
            "whoever is in the rooms the file is sent to; {}",
            federation_recipients(config)
        ),
        settings: vec![
            "media_retention.local_max_lifetime",
            "media_retention.remote_max_lifetime",
            "max_upload_size",
            "media_encryption_key_file",
        ],
    });
    let ip_kept = match config.audit_ip_mode {
        crate::policy::audit::IpMode::Truncate => "shortened (IPv4 to /24, IPv6 to /48)",
        crate::policy::audit::IpMode::Hash => "as a keyed hash",
        crate::policy::audit::IpMode::Keep => "in full",
        crate::policy::audit::IpMode::Drop => "not at all",
    };
    categories.push(Category {
        id: "audit_log",
        data: format!("connection data: when you logged in and out (and failed logins), from which device, IP address ({ip_kept}) and client (user agent); when you joined and left rooms; admin actions and policy decisions that concern you"),
        purpose: "security and the record of connection data the organization must keep (who connected when, from where)".into(),
        kept_for: if config.audit_retention_days == 0 {
            "forever (no audit retention is set)".into()
        } else {
            format!("{} days", config.audit_retention_days)
        },
        recipients: "the server's admins only".into(),
        settings: vec!["audit_ip_mode", "audit_retention_days", "audit_connection_interval_secs"],
    });
    categories.push(Category {
        id: "encryption_keys",
        data: "the public keys of your devices, one-time keys, cross-signing keys, and, if you use key backup, your encrypted room keys (the server cannot read them)".into(),
        purpose: "so that others can verify you and your devices can decrypt messages".into(),
        kept_for: "until the device is logged out or the backup deleted; erasure removes them".into(),
        recipients: format!("public keys: the people you share encrypted rooms with; {}", federation_recipients(config)),
        settings: vec![],
    });
    categories.push(Category {
        id: "presence",
        data: if config.allow_presence {
            "whether you are online, and when you were last active".into()
        } else {
            "nothing: presence (online status) is off on this server".into()
        },
        purpose: "to show others whether you are reachable".into(),
        kept_for: "only the latest status".into(),
        recipients: if config.allow_presence {
            format!(
                "the people you share rooms with; {}",
                federation_recipients(config)
            )
        } else {
            "nobody".into()
        },
        settings: vec!["allow_presence"],
    });
    categories.push(Category {
        id: "push",
        data: "if your phone gets notifications: the push gateway address and your device's push key; for each notification the room, the event id and the unread count".into(),
        purpose: "to wake your phone when a message arrives".into(),
        kept_for: "until the app removes the pusher or the device is logged out".into(),
        recipients: "the push gateway your app names (listed in the admins' register of destinations)".into(),
        settings: vec!["push_gateway_ip_range_allowlist"],
    });
    categories.push(Category {
        id: "user_directory",
        data: "your user id, display name and avatar are searchable by other users".into(),
        purpose: "so colleagues can find you".into(),
        kept_for: "while your account exists".into(),
        recipients: if config.groups.is_empty() {
            "users who share a room with you or a public room (and groups made by the admins decide who may find you)".into()
        } else {
            "only users of your own closed user group (or of groups allowed to contact it)".into()
        },
        settings: vec!["groups", "group_contact"],
    });
    if !config.oidc_providers.is_empty() || config.jwt.is_some() {
        let mut via: Vec<String> = config
            .oidc_providers
            .iter()
            .map(|p| format!("{} ({})", p.idp_name, p.issuer))
            .collect();
        if config.jwt.is_some() {
            via.push("the organization's token service (JWT login)".into());
        }
        categories.push(Category {
            id: "identity_provider",
            data: "which user of the organization's identity provider you are (its subject id), and the groups it named at your latest login".into(),
            purpose: "logging in with your organization account; closed user groups that follow the organization's groups".into(),
            kept_for: "the groups until your next login; the link while your account exists (erasure deletes both)".into(),
            recipients: format!(
                "nothing about your chats goes to the identity provider; you log in there: {}",
                via.join(", ")
            ),
            settings: vec!["oidc_providers", "jwt", "groups"],
        });
    }
    if config.url_preview_enabled {
        categories.push(Category {
            id: "url_previews",
            data: "the web addresses your client asks the server to preview".into(),
            purpose: "to show a preview of links".into(),
            kept_for: "the preview is cached; the request is not logged with your name".into(),
            recipients: "the web site the link points to (fetched by the server, not your device)"
                .into(),
            settings: vec!["url_preview_enabled"],
        });
    }
    if !config.turn_uris.is_empty() {
        categories.push(Category {
            id: "voip",
            data: "for calls: time-limited TURN credentials".into(),
            purpose: "to connect calls through firewalls".into(),
            kept_for: format!("credentials expire after {} seconds", config.turn_ttl),
            recipients: format!("the TURN server(s): {}", config.turn_uris.join(", ")),
            settings: vec!["turn_uris", "turn_ttl"],
        });
    }
    categories.push(Category {
        id: "reports",
        data: "content you report to the admins, with your reason".into(),
        purpose: "moderation".into(),
        kept_for: "until the admins delete the report; erasure pseudonymizes you in it".into(),
        recipients: "the server's admins".into(),
        settings: vec![],
    });
    categories.push(Category {
        id: "backups",
        data: if config.backup_encryption_key_file.is_some()
            || config.media_encryption_key_file.is_some()
        {
            "copies of the whole database and media store, encrypted".into()
        } else {
            "copies of the whole database and media store".into()
        },
        purpose: "to restore the service after a failure".into(),
        kept_for: match (&config.backup_path, config.backup_interval_secs, config.backup_keep) {
            (None, _, _) => "no backups are configured on this server".into(),
            (Some(_), Some(secs), Some(keep)) => format!(
                "the newest {keep} backups, one taken every {}: a backup keeps what was deleted after it was taken for at most {}",
                human_duration(secs.saturating_mul(1000)),
                human_duration(secs.saturating_mul(1000).saturating_mul(u64::from(keep)))
            ),
            (Some(_), None, Some(keep)) => format!(
                "the newest {keep} backups; a backup keeps what was deleted after it was taken until it is deleted"
            ),
            (Some(_), _, None) => "until the operator deletes them; a backup keeps what was deleted after it was taken".into(),
        },
        recipients: "nobody (kept by the operator)".into(),
        settings: vec![
            "backup_path",
            "backup_interval_secs",
            "backup_keep",
            "backup_encryption_key_file",
        ],
    });
    Statement {
        server_name: config.server_name.to_string(),
        privacy_notice: config.privacy_notice.as_ref().map(|p| NoticeRef {
            name: p.name.clone().unwrap_or_else(|| "Privacy notice".into()),
            url: p.url.clone(),
            version: p.version.clone(),
        }),
        categories,
        rights: vec![
            "Access and portability: download all your data as one archive (GET /_hafen/client/v1/export with your access token).".into(),
            "Erasure: deactivate your account with erasure (POST /_matrix/client/v3/account/deactivate with \"erase\": true); your messages are redacted, also on other servers.".into(),
            "Correction: change your display name and avatar, redact your messages.".into(),
            "The admins of this server answer every other request.".into(),
        ],
    }
}

pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

impl Statement {
    /// Add the application services (bridges) registered now (from files and the admin API),
    /// which receive the events of the rooms that interest them: a recipient users must know of.
    pub fn with_appservices(mut self, appservices: &[String]) -> Statement {
        if appservices.is_empty() {
            return self;
        }
        let index = self
            .categories
            .iter()
            .position(|c| c.id == "messages")
            .map_or(self.categories.len(), |i| i + 1);
        self.categories.insert(
            index,
            Category {
                id: "bridges",
                data: "the messages, state, typing notices and read receipts of rooms in which a bridged user takes part (or that a bridge manages), also yours".into(),
                purpose: "to connect rooms with other messaging networks through bridges the operator runs".into(),
                kept_for: "as long as the bridge keeps them (ask the operator); the server keeps them as any message".into(),
                recipients: format!(
                    "the bridges (application services) registered by the operator: {}",
                    appservices.join(", ")
                ),
                settings: vec!["app_service_config_files"],
            },
        );
        self
    }

    /// The statement as a self-contained web page.
    pub fn to_html(&self) -> String {
        let mut h = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>What {0} stores about you</title></head><body><h1>What {0} stores about you</h1>",
            escape(&self.server_name)
        );
        if let Some(n) = &self.privacy_notice {
            h.push_str(&format!(
                "<p>The operator's privacy notice: <a href=\"{}\">{}</a> (version {}).</p>",
                escape(&n.url),
                escape(&n.name),
                escape(&n.version)
            ));
        }
        h.push_str("<p>Generated from this server's current settings.</p><table border=\"1\"><tr><th>data</th><th>why</th><th>kept for</th><th>who receives it</th></tr>");
        for c in &self.categories {
            h.push_str(&format!(
                "<tr id=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                c.id,
                escape(&c.data),
                escape(&c.purpose),
                escape(&c.kept_for),
                escape(&c.recipients)
            ));
        }
        h.push_str("</table><h2>Your rights</h2><ul>");
        for r in &self.rights {
            h.push_str(&format!("<li>{}</li>", escape(r)));
        }
        h.push_str("</ul></body></html>");
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(86_400_000), "1 day");
        assert_eq!(human_duration(30 * 86_400_000), "30 days");
        assert_eq!(human_duration(3 * 3_600_000), "3 hours");
        assert_eq!(human_duration(90_000), "90 seconds");
        assert_eq!(human_duration(86_400_000 + 1), "about 1 day");
        assert_eq!(human_duration(500), "500 ms");
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
