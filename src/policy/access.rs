//! Who may reach whom: the closed user groups, the rooms bound to a group, the federation
//! policy at the user-facing hook points, the external policy hook, the device limit and the
//! client version policy. Every check here that denies something writes a `policy_denied` audit
//! entry (a blocked client at most once per device an hour) and answers 403 `M_FORBIDDEN` with
//! a message naming the policy.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use ruma::{
    events::{StateEventType, TimelineEventType},
    RoomId, ServerName, UserId,
};
use serde_json::{json, Map, Value};

use super::{
    audit::{AuditEntry, AuditLog},
    groups::{Groups, ROOM_GROUP_KEY},
    hook::{Decision, PolicyHook},
};
use crate::{
    config::Config,
    error::{ErrCode, Error, Result},
    service::{rooms::Pdu, Services},
    utils,
};

/// Policy names used in messages and audit entries.
pub const GROUPS: &str = "closed_user_groups";
pub const ROOM_GROUP: &str = "room_group";
pub const FEDERATION: &str = "federation";
pub const HOOK: &str = "policy_hook";
pub const MAX_DEVICES: &str = "max_devices_per_user";
pub const BLOCKED_AGENTS: &str = "blocked_user_agents";
pub const MIN_VERSIONS: &str = "min_user_agent_versions";

/// A blocked client is audited at most once per device in this many ms.
const CLIENT_AUDIT_INTERVAL_MS: u64 = 3_600_000;
const CLIENT_AUDIT_TRACKED: usize = 10_000;

/// Denied federation requests are audited at most once per server in this many ms (the origin
/// of a refused request is not verified, so anyone could otherwise fill the log).
const FEDERATION_AUDIT_INTERVAL_MS: u64 = 60_000;
const FEDERATION_AUDIT_TRACKED: usize = 1024;

pub struct Access {
    /// Shared with the to-device inbox, which applies the same contact rules.
    pub groups: Arc<Groups>,
    pub hook: Option<PolicyHook>,
    federation_audited: Mutex<HashMap<String, u64>>,
    /// (user, device) -> when a blocked client was last audited.
    client_audited: Mutex<HashMap<(String, String), u64>>,
}

impl Access {
    pub fn new(groups: Arc<Groups>, config: &Config) -> Result<Access> {
        Ok(Access {
            groups,
            hook: config
                .policy_hook
                .as_ref()
                .map(PolicyHook::new)
                .transpose()?,
            federation_audited: Mutex::new(HashMap::new()),
            client_audited: Mutex::new(HashMap::new()),
        })
    }
}

/// Record a denial and make the error the user gets.
pub fn deny(
    s: &Services,
    user: Option<&UserId>,
    room: Option<&RoomId>,
    policy: &str,
    action: &str,
    message: &str,
    detail: Map<String, Value>,
) -> Error {
    deny_with(&s.audit, user, room, policy, action, message, detail)
}

/// [`deny`] for services that hold the audit log but not `Services` (the to-device inbox).
pub fn deny_with(
    audit: &AuditLog,
    user: Option<&UserId>,
    room: Option<&RoomId>,
    policy: &str,
    action: &str,
    message: &str,
    mut detail: Map<String, Value>,
) -> Error {
    detail.insert("policy".into(), json!(policy));
    detail.insert("action".into(), json!(action));
    if let Err(e) = audit.record(AuditEntry {
        kind: "policy_denied".into(),
        user: user.map(|u| u.to_string()),
        room: room.map(|r| r.to_string()),
        detail: Value::Object(detail),
        ..AuditEntry::default()
    }) {
        tracing::warn!("audit: recording a policy denial failed: {e}");
    }
    Error::forbidden(format!("Denied by the {policy} policy: {message}"))
}

/// Device limit (C1): may `user` log in with `device` (None: a new, generated id)? Logging in
/// again with a device id the user has is always allowed.
pub fn check_device_limit(
    s: &Services,
    user: &UserId,
    device: Option<&ruma::DeviceId>,
) -> Result<()> {
    let max = s.config.max_devices_per_user;
    if max == 0 {
        return Ok(());
    }
    if let Some(d) = device {
        if s.accounts.device(user, d)?.is_some() {
            return Ok(());
        }
    }
    let count = s.accounts.devices(user)?.len() as u64;
    if count < max {
        return Ok(());
    }
    Err(deny(
        s,
        Some(user),
        None,
        MAX_DEVICES,
        "login",
        &format!("at most {max} devices per user; log out another device first"),
        detail(&[("devices", &count.to_string())]),
    ))
}

/// Does a `blocked_user_agents` entry match `agent`: a glob with `*` over the whole agent, or
/// else a substring.
fn agent_matches(pattern: &str, agent: &str) -> bool {
    if pattern.contains('*') {
        crate::service::filter::glob(pattern, agent)
    } else {
        !pattern.is_empty() && agent.contains(pattern)
    }
}

/// Client version policy (C3): refuse authenticated requests of clients whose user agent is
/// blocked or names a version below a minimum. Audited at most once per device an hour.
/// Nothing to do without blocked agents or minimums.
pub fn check_client(
    s: &Services,
    user: &UserId,
    device: &ruma::DeviceId,
    user_agent: Option<&str>,
) -> Result<()> {
    let (blocked, minimums) = (
        &s.config.blocked_user_agents,
        &s.config.min_user_agent_versions,
    );
    if blocked.is_empty() && minimums.is_empty() {
        return Ok(());
    }
    let agent = user_agent.unwrap_or("");
    // (policy, what matched, the message)
    let (policy, matched, message) = match blocked.iter().find(|p| agent_matches(p, agent)) {
        Some(pattern) => (
            BLOCKED_AGENTS,
            pattern.clone(),
            "this client version is not allowed on this server; please update it".to_owned(),
        ),
        None => match super::client_version::too_old(minimums, agent) {
            Some((token, message)) => (MIN_VERSIONS, token, message),
            None => return Ok(()),
        },
    };
    let now = utils::now_ms();
    let audit = {
        let mut seen = s
            .access
            .client_audited
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (user.to_string(), device.to_string());
        let due = seen
            .get(&key)
            .is_none_or(|t| now.saturating_sub(*t) >= CLIENT_AUDIT_INTERVAL_MS);
        if due {
            if seen.len() >= CLIENT_AUDIT_TRACKED {
                seen.retain(|_, t| now.saturating_sub(*t) < CLIENT_AUDIT_INTERVAL_MS);
                if seen.len() >= CLIENT_AUDIT_TRACKED {
                    seen.clear();
                }
            }
            seen.insert(key, now);
        }
        due
    };
    if !audit {
        return Err(Error::forbidden(format!(
            "Denied by the {policy} policy: {message}"
        )));
    }
    let agent_short: String = agent.chars().take(255).collect();
    Err(deny(
        s,
        Some(user),
        None,
        policy,
        "request",
        &message,
        detail(&[
            ("device", device.as_str()),
            (
                if policy == BLOCKED_AGENTS {
                    "pattern"
                } else {
                    "token"
                },
                &matched,
            ),
            ("user_agent", &agent_short),
        ]),
    ))
}

fn detail(pairs: &[(&str, &str)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect()
}

/// The group a room is bound to (`org.hafen.group` in its create event), if any.
pub fn room_group(s: &Services, room: &RoomId) -> Result<Option<String>> {
    Ok(s.rooms
        .state_content(room, &StateEventType::RoomCreate, "")?
        .and_then(|c| {
            c.get(ROOM_GROUP_KEY)
                .and_then(Value::as_str)
                .map(str::to_owned)
        }))
}

/// May this server exchange anything with `server` on behalf of `user` (a local user's invite,
/// join or fetch)?
pub fn check_federation(
    s: &Services,
    user: Option<&UserId>,
    room: Option<&RoomId>,
    server: &ServerName,
    action: &str,
) -> Result<()> {
    if server == s.globals.server_name {
        return Ok(());
    }
    if s.policy.may_federate_with(server).is_err() {
        return Err(deny(
            s,
            user,
            room,
            FEDERATION,
            action,
            &format!("this server does not federate with {server}"),
            detail(&[("server", server.as_str())]),
        ));
    }
    Ok(())
}

/// The policy check of an incoming federation request's (claimed) origin, audited at most once
/// a minute per server.
pub fn check_federation_origin(s: &Services, origin: &ServerName, path: &str) -> Result<()> {
    if let Err(e) = s.policy.may_federate_with(origin) {
        let now = utils::now_ms();
        let due = {
            let mut seen = s
                .access
                .federation_audited
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if seen.len() >= FEDERATION_AUDIT_TRACKED {
                seen.clear();
            }
            let last = seen.get(origin.as_str()).copied().unwrap_or(0);
            let due = now.saturating_sub(last) >= FEDERATION_AUDIT_INTERVAL_MS;
            if due {
                seen.insert(origin.as_str().to_owned(), now);
            }
            due
        };
        if due {
            let _ = deny(
                s,
                None,
                None,
                FEDERATION,
                "federation_request",
                "",
                detail(&[("server", origin.as_str()), ("path", path)]),
            );
        }
        return Err(e);
    }
    Ok(())
}

/// May `actor` contact `target` (invite, DM) under the closed user groups?
pub fn check_contact(
    s: &Services,
    actor: &UserId,
    target: &UserId,
    room: Option<&RoomId>,
    action: &str,
) -> Result<()> {
    if !s.access.groups.may_contact(actor, target) {
        return Err(deny(
            s,
            Some(actor),
            room,
            GROUPS,
            action,
            &format!("{actor} and {target} are not in groups that may contact each other"),
            detail(&[("target", target.as_str())]),
        ));
    }
    Ok(())
}

/// Is `user` allowed into a room bound to `group` (`None`: not bound)?
fn check_bound(
    s: &Services,
    group: Option<&str>,
    user: &UserId,
    actor: &UserId,
    room: Option<&RoomId>,
    action: &str,
) -> Result<()> {
    let Some(group) = group else {
        return Ok(());
    };
    if !s.access.groups.is_member(group, user) {
        return Err(deny(
            s,
            Some(actor),
            room,
            ROOM_GROUP,
            action,
            &format!("the room is bound to the group {group}, which {user} is not a member of"),
            detail(&[("target", user.as_str()), ("group", group)]),
        ));
    }
    Ok(())
}

/// `sender` invites `target` into `room`: the federation policy for a remote target, the
/// closed user groups, and the room's group.
pub fn check_invite(s: &Services, room: &RoomId, sender: &UserId, target: &UserId) -> Result<()> {
    check_federation(s, Some(sender), Some(room), target.server_name(), "invite")?;
    check_contact(s, sender, target, Some(room), "invite")?;
    check_bound(
        s,
        room_group(s, room)?.as_deref(),
        target,
        sender,
        Some(room),
        "invite",
    )
}

/// `user` (local or remote) joins `room`, which this server is in: the room's group, and the
/// closed user groups against everybody joined already (sharing a room is contact too).
pub fn check_join(s: &Services, room: &RoomId, user: &UserId) -> Result<()> {
    check_membership(s, room, user, "join")
}

/// `user` joins or knocks (`action`): see [`check_join`].
pub fn check_membership(s: &Services, room: &RoomId, user: &UserId, action: &str) -> Result<()> {
    check_bound(
        s,
        room_group(s, room)?.as_deref(),
        user,
        user,
        Some(room),
        action,
    )?;
    check_share(s, room, user, action, false)
}

/// The closed user groups for `user` joining (or knocking on) `room`: they may contact every
/// joined member, or with `local_only` every joined member of this server (for other servers'
/// events: whom their users share a room with is their servers' business, ours is ours).
fn check_share(
    s: &Services,
    room: &RoomId,
    user: &UserId,
    action: &str,
    local_only: bool,
) -> Result<()> {
    let groups = &s.access.groups;
    if !groups.active() {
        return Ok(());
    }
    let mine = groups.groups_of(user);
    let mut checked: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    for member in s.rooms.joined_members(room)?.iter() {
        if member == user || (local_only && member.server_name() != s.globals.server_name) {
            continue;
        }
        let theirs = groups.groups_of(member);
        if checked.contains(&theirs) {
            continue;
        }
        if !groups.sets_may_contact(&mine, &theirs) {
            return Err(deny(
                s,
                Some(user),
                Some(room),
                GROUPS,
                action,
                &format!("{user} may not share a room with {member}"),
                detail(&[("target", member.as_str())]),
            ));
        }
        checked.insert(theirs);
    }
    Ok(())
}

/// The membership write path (`Rooms::admit_membership`): every `m.room.member` event about to
/// become part of a room here, built by this server (`prepare_local`, whatever endpoint, room
/// upgrade or appservice asked for it) or accepted from another server (`federation::incoming`),
/// passes this after the auth rules allowed it. Invites, joins and knocks are checked against
/// the federation policy (invites this server's users send), the closed user groups, the group
/// the room is bound to and `m.room.guest_access` (this server's guests); leaves and bans are
/// never refused. The room's lock is held: no await here, and nothing that takes it.
///
/// The entry points keep their own earlier checks (cheaper, and before anything is sent to
/// another server); they decide by the same rules on the same state, so a request refused there
/// never gets here and one allowed there passes here: each denial is audited once.
pub fn check_membership_event(s: &Services, room: &RoomId, pdu: &Pdu) -> Result<()> {
    if pdu.kind != TimelineEventType::RoomMember {
        return Ok(());
    }
    let Some(membership) = pdu.membership() else {
        return Ok(());
    };
    if !matches!(membership.as_str(), "invite" | "join" | "knock") {
        return Ok(());
    }
    let Some(target) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()) else {
        return Ok(());
    };
    let own = &*s.globals.server_name;
    let sender = &*pdu.sender;
    let local_sender = sender.server_name() == own;
    let current = s.rooms.membership(room, &target)?;
    // A join or knock that changes nobody's company (a profile change of a member) is not a new
    // membership: the rules were applied when it began.
    if membership != "invite" && current.as_deref() == Some(membership.as_str()) {
        return Ok(());
    }
    let group = binding_in_force(s, room, local_sender)?;
    if membership == "invite" {
        if local_sender {
            check_federation(s, Some(sender), Some(room), target.server_name(), "invite")?;
        }
        if local_sender || target.server_name() == own {
            check_contact(s, sender, &target, Some(room), "invite")?;
        }
        return check_bound(s, group.as_deref(), &target, sender, Some(room), "invite");
    }
    if membership == "join" && target.server_name() == own {
        check_guest_access(s, room, &target)?;
    }
    check_bound(
        s,
        group.as_deref(),
        &target,
        &target,
        Some(room),
        &membership,
    )?;
    check_share(s, room, &target, &membership, !local_sender)
}

/// The group `room` is bound to, when this server enforces it for an event: always for events
/// of this server's users (a group unknown here admits nobody, as at the entry points), and for
/// other servers' events when the room was made here or the group exists here (a room made
/// elsewhere may be bound to a group only its server knows: that server decides).
fn binding_in_force(s: &Services, room: &RoomId, local_sender: bool) -> Result<Option<String>> {
    let Some(create) = s.rooms.state_get(room, "m.room.create", "")? else {
        return Ok(None);
    };
    let Some(group) = create
        .content_value()
        .get(ROOM_GROUP_KEY)
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let ours = create.sender.server_name() == s.globals.server_name;
    if local_sender || ours || s.access.groups.exists(&group) {
        Ok(Some(group))
    } else {
        Ok(None)
    }
}

/// A guest of this server joins only rooms whose `m.room.guest_access` is `can_join` (spec,
/// "Guest access": servers MUST refuse other joins of guests).
pub fn check_guest_access(s: &Services, room: &RoomId, user: &UserId) -> Result<()> {
    if !s.accounts.user(user)?.is_some_and(|u| u.guest) {
        return Ok(());
    }
    if guest_access_open(s, room)? {
        return Ok(());
    }
    Err(Error::new(
        ErrCode::GuestAccessForbidden,
        "Guests may not join this room (its m.room.guest_access is not can_join)",
    ))
}

/// May `user` peek into the world-readable `room`: anyone but this server's guests, and those
/// only where `m.room.guest_access` is `can_join`.
pub fn guest_may_peek(s: &Services, room: &RoomId, user: &UserId) -> Result<bool> {
    if !s.accounts.user(user)?.is_some_and(|u| u.guest) {
        return Ok(true);
    }
    guest_access_open(s, room)
}

/// Does `room` let guests in (`m.room.guest_access` is `can_join`)?
pub fn guest_access_open(s: &Services, room: &RoomId) -> Result<bool> {
    Ok(s.rooms
        .state_content(room, &StateEventType::RoomGuestAccess, "")?
        .is_some_and(|c| c.get("guest_access").and_then(Value::as_str) == Some("can_join")))
}

/// To-device messages (`ToDevice::send_with`, for this server's users' requests and for the
/// messages other servers deliver): the sender may reach each target only as the closed user
/// groups let them contact them. Refused as a whole, audited once naming the first target.
pub fn check_to_device<'a>(
    groups: &Groups,
    audit: &AuditLog,
    sender: &UserId,
    targets: impl IntoIterator<Item = &'a UserId>,
) -> Result<()> {
    if !groups.active() {
        return Ok(());
    }
    let mut seen: BTreeSet<&UserId> = BTreeSet::new();
    for target in targets {
        if !seen.insert(target) || groups.may_contact(sender, target) {
            continue;
        }
        return Err(deny_with(
            audit,
            Some(sender),
            None,
            GROUPS,
            "to_device",
            &format!("{sender} and {target} are not in groups that may contact each other"),
            detail(&[("target", target.as_str())]),
        ));
    }
    Ok(())
}

/// createRoom: the group the room is bound to must exist and have the creator, every invitee
/// must be reachable (federation, groups, the room's group).
pub fn check_create(
    s: &Services,
    creator: &UserId,
    creation_content: &Map<String, Value>,
    invites: &[ruma::OwnedUserId],
) -> Result<()> {
    let group = match creation_content.get(ROOM_GROUP_KEY) {
        None => None,
        Some(Value::String(g)) => {
            if !s.access.groups.exists(g) {
                return Err(Error::invalid_param(format!("There is no group named {g}")));
            }
            Some(g.as_str())
        }
        Some(_) => {
            return Err(Error::bad_json(format!(
                "{ROOM_GROUP_KEY} must be a group name"
            )))
        }
    };
    check_bound(s, group, creator, creator, None, "create_room")?;
    for target in invites {
        check_federation(s, Some(creator), None, target.server_name(), "invite")?;
        check_contact(s, creator, target, None, "invite")?;
        check_bound(s, group, target, creator, None, "invite")?;
    }
    Ok(())
}

/// Ask the external policy hook (when configured) about `action` by `user`.
pub async fn check_hook(
    s: &Services,
    user: &UserId,
    room: Option<&RoomId>,
    action: &str,
    mut description: Map<String, Value>,
) -> Result<()> {
    let Some(hook) = &s.access.hook else {
        return Ok(());
    };
    description.insert("action".into(), json!(action));
    description.insert("user_id".into(), json!(user));
    description.insert("server_name".into(), json!(s.globals.server_name));
    if let Some(r) = room {
        description.insert("room_id".into(), json!(r));
    }
    match hook.ask(&Value::Object(description)).await {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => Err(deny(
            s,
            Some(user),
            room,
            HOOK,
            action,
            &reason,
            detail(&[("reason", reason.as_str())]),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::agent_matches;

    #[test]
    fn blocked_agent_patterns() {
        assert!(agent_matches("OldClient/0.", "OldClient/0.9 (Linux)"));
        assert!(agent_matches("OldClient/0.", "Mozilla OldClient/0.1"));
        assert!(!agent_matches("OldClient/0.", "OldClient/1.0"));
        assert!(agent_matches("Legacy*/1.*", "LegacyApp/1.2"));
        assert!(!agent_matches("Legacy*/1.*", "MyLegacyApp/1.2"));
        assert!(agent_matches("*", ""));
        assert!(!agent_matches("", "anything"));
    }
}
