//! Closed user groups (D1, A3): who may contact whom. Groups come from the config
//! (`[[global.groups]]`, read-only) and from the admin API (kept in the `groups` table). With no
//! group at all everybody may contact everybody; as soon as one exists, users may invite, start a
//! DM with, find and share a room with only members of a group they belong to, or of a group
//! `group_contact` pairs with one of theirs. A group may also name group values of the identity
//! provider (`sso_groups`): users whose latest SSO or JWT login carried one of them are members
//! (`policy::claims`), until a later login no longer carries it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::RwLock,
};

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    config::Config,
    error::{Error, Result},
    storage::{Storage, Table},
};

/// The `creation_content` key (kept in `m.room.create`) that binds a room to a group.
pub const ROOM_GROUP_KEY: &str = "org.hafen.group";
/// Most groups, and most members of one group, accepted (config and admin API).
pub const MAX_GROUPS: usize = 1000;
pub const MAX_MEMBERS: usize = 10_000;

/// One group: users by id and partner organizations by server name, both with `*` globs.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub servers: Vec<String>,
    /// Group names from the identity provider's groups claim (exact match), e.g. `["staff"]`
    /// or Keycloak's `["/staff"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sso_groups: Vec<String>,
}

impl GroupConfig {
    /// Is `user` (whose identity provider named the groups `claimed`) a member?
    fn contains(&self, user: &UserId, claimed: &BTreeSet<String>) -> bool {
        if self.sso_groups.iter().any(|g| claimed.contains(g)) {
            return true;
        }
        let id = user.as_str();
        // Server entries match as the federation lists do: the host whatever the port, unless
        // the entry names one.
        self.users
            .iter()
            .any(|p| crate::service::filter::glob(p, id))
            || self
                .servers
                .iter()
                .any(|p| super::server_matches(p, user.server_name()))
    }
}

impl GroupConfig {
    /// The group as the admin API lists it (`sso_groups` only when it has some).
    fn describe(&self, source: &str) -> Value {
        let mut v = json!({ "name": self.name, "users": self.users, "servers": self.servers, "source": source });
        if !self.sso_groups.is_empty() {
            v["sso_groups"] = json!(self.sso_groups);
        }
        v
    }
}

/// Check the configured groups (names unique and sane, contact pairs naming known groups).
pub fn validate(
    groups: &[GroupConfig],
    contact: &[[String; 2]],
) -> std::result::Result<(), String> {
    if groups.len() > MAX_GROUPS {
        return Err(format!("groups: at most {MAX_GROUPS} groups"));
    }
    let mut names = BTreeSet::new();
    for g in groups {
        valid_name(&g.name).map_err(|e| format!("groups: {e}"))?;
        if !names.insert(g.name.as_str()) {
            return Err(format!("groups: `{}` is defined twice", g.name));
        }
        if g.users.len() + g.servers.len() + g.sso_groups.len() > MAX_MEMBERS {
            return Err(format!("groups: `{}` has too many members", g.name));
        }
        if let Some(u) = g
            .users
            .iter()
            .find(|u| !u.starts_with('@') || !u.contains(':'))
        {
            return Err(format!(
                "groups: `{u}` in `{}` is not a user id (like \"@alice:example.org\" or \"@*:example.org\")",
                g.name
            ));
        }
    }
    for [a, b] in contact {
        for n in [a, b] {
            if !names.contains(n.as_str()) {
                return Err(format!("group_contact: no group is named `{n}`"));
            }
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "`{name}` is not a valid group name (1-100 of a-z, A-Z, 0-9, -, _, .)"
        ));
    }
    Ok(())
}

/// The groups in force.
pub struct Groups {
    storage: Storage,
    /// Only this server's users have identity-provider claims.
    server_name: ruma::OwnedServerName,
    config: Vec<GroupConfig>,
    contact: Vec<[String; 2]>,
    /// The admin API's groups, loaded at start and written through.
    runtime: RwLock<BTreeMap<String, GroupConfig>>,
}

impl Groups {
    pub fn new(storage: Storage, config: &Config) -> Result<Groups> {
        let mut runtime = BTreeMap::new();
        for item in storage.scan_prefix(Table::Groups, b"")?.take(MAX_GROUPS) {
            let (_, v) = item?;
            let g: GroupConfig = serde_json::from_slice(&v)?;
            runtime.insert(g.name.clone(), g);
        }
        Ok(Groups {
            storage,
            server_name: config.server_name.clone(),
            config: config.groups.clone(),
            contact: config.group_contact.clone(),
            runtime: RwLock::new(runtime),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, GroupConfig>> {
        self.runtime.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Are closed user groups in force (any group configured or made)?
    pub fn active(&self) -> bool {
        !self.config.is_empty() || !self.read().is_empty()
    }

    /// The group names the identity provider gave `user` at their latest login, read only when
    /// some group names identity-provider groups.
    fn claimed(&self, user: &UserId) -> BTreeSet<String> {
        let any = self.config.iter().any(|g| !g.sso_groups.is_empty())
            || self.read().values().any(|g| !g.sso_groups.is_empty());
        if any && user.server_name() == self.server_name {
            super::claims::groups(&self.storage, user)
        } else {
            BTreeSet::new()
        }
    }

    /// The names of the groups `user` belongs to.
    pub fn groups_of(&self, user: &UserId) -> BTreeSet<String> {
        let claimed = self.claimed(user);
        let mut out: BTreeSet<String> = self
            .config
            .iter()
            .filter(|g| g.contains(user, &claimed))
            .map(|g| g.name.clone())
            .collect();
        out.extend(
            self.read()
                .values()
                .filter(|g| g.contains(user, &claimed))
                .map(|g| g.name.clone()),
        );
        out
    }

    /// Is there a group named `name`?
    pub fn exists(&self, name: &str) -> bool {
        self.config.iter().any(|g| g.name == name) || self.read().contains_key(name)
    }

    /// Is `user` a member of the group `name`?
    pub fn is_member(&self, name: &str, user: &UserId) -> bool {
        let claimed = self.claimed(user);
        self.config
            .iter()
            .find(|g| g.name == name)
            .is_some_and(|g| g.contains(user, &claimed))
            || self
                .read()
                .get(name)
                .is_some_and(|g| g.contains(user, &claimed))
    }

    /// May users of the groups `mine` contact users of the groups `theirs`?
    pub fn sets_may_contact(&self, mine: &BTreeSet<String>, theirs: &BTreeSet<String>) -> bool {
        if mine.intersection(theirs).next().is_some() {
            return true;
        }
        self.contact.iter().any(|[a, b]| {
            (mine.contains(a) && theirs.contains(b)) || (mine.contains(b) && theirs.contains(a))
        })
    }

    /// May `a` contact `b` (invite, DM, find, share a room)? Always when no group exists, and
    /// everybody may contact themselves.
    pub fn may_contact(&self, a: &UserId, b: &UserId) -> bool {
        if a == b || !self.active() {
            return true;
        }
        self.sets_may_contact(&self.groups_of(a), &self.groups_of(b))
    }

    /// Every group, for the admin API.
    pub fn list(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self.config.iter().map(|g| g.describe("config")).collect();
        out.extend(self.read().values().map(|g| g.describe("admin_api")));
        out
    }

    fn writable(&self, name: &str) -> Result<()> {
        if self.config.iter().any(|g| g.name == name) {
            return Err(Error::forbidden(format!(
                "The group {name} is defined in the config file and cannot be changed at runtime"
            )));
        }
        Ok(())
    }

    fn save(&self, g: &GroupConfig) -> Result<()> {
        self.storage
            .put(Table::Groups, g.name.as_bytes(), &serde_json::to_vec(g)?)
    }

    /// Make a runtime group (nothing changes when it exists already).
    pub fn create(&self, name: &str) -> Result<()> {
        valid_name(name).map_err(Error::invalid_param)?;
        self.writable(name)?;
        let mut runtime = self.runtime.write().unwrap_or_else(|e| e.into_inner());
        if runtime.contains_key(name) {
            return Ok(());
        }
        if runtime.len() + self.config.len() >= MAX_GROUPS {
            return Err(Error::forbidden("Too many groups"));
        }
        let g = GroupConfig {
            name: name.to_owned(),
            ..GroupConfig::default()
        };
        self.save(&g)?;
        runtime.insert(name.to_owned(), g);
        Ok(())
    }

    /// Delete a runtime group.
    pub fn delete(&self, name: &str) -> Result<()> {
        self.writable(name)?;
        let mut runtime = self.runtime.write().unwrap_or_else(|e| e.into_inner());
        if runtime.remove(name).is_none() {
            return Err(Error::not_found("No such group"));
        }
        let mut b = self.storage.batch();
        b.delete(Table::Groups, name.as_bytes())?;
        b.commit()
    }

    /// Add (`add`) or remove a member of a runtime group: a user id (`@...`, globs allowed) or a
    /// server name.
    pub fn change_member(&self, name: &str, member: &str, add: bool) -> Result<()> {
        self.writable(name)?;
        let is_user = member.starts_with('@');
        if member.is_empty() || member.len() > 255 || (is_user && !member.contains(':')) {
            return Err(Error::invalid_param(
                "A member is a user id (\"@alice:example.org\") or a server name",
            ));
        }
        let mut runtime = self.runtime.write().unwrap_or_else(|e| e.into_inner());
        let g = runtime
            .get_mut(name)
            .ok_or_else(|| Error::not_found("No such group"))?;
        let list = if is_user {
            &mut g.users
        } else {
            &mut g.servers
        };
        if add {
            if !list.iter().any(|m| m == member) {
                if list.len() >= MAX_MEMBERS {
                    return Err(Error::forbidden("The group has too many members"));
                }
                list.push(member.to_owned());
            }
        } else {
            list.retain(|m| m != member);
        }
        let g = g.clone();
        self.save(&g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> &UserId {
        <&UserId>::try_from(s).expect("user id")
    }

    #[test]
    fn contact_rules() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = Storage::open(dir.path(), 8, false).expect("storage");
        let mut c = Config::default();
        let none = Groups::new(storage.clone(), &c).expect("groups");
        assert!(none.may_contact(uid("@a:x.example"), uid("@b:y.example")));
        c.groups = vec![
            GroupConfig {
                name: "staff".into(),
                users: vec!["@*:x.example".into()],
                servers: vec![],
                sso_groups: vec![],
            },
            GroupConfig {
                name: "partners".into(),
                users: vec![],
                servers: vec!["*.partner.example".into()],
                sso_groups: vec![],
            },
            GroupConfig {
                name: "board".into(),
                users: vec!["@boss:x.example".into()],
                servers: vec!["board.example".into()],
                sso_groups: vec![],
            },
        ];
        c.group_contact = vec![["staff".into(), "partners".into()]];
        assert!(validate(&c.groups, &c.group_contact).is_ok());
        let g = Groups::new(storage.clone(), &c).expect("groups");
        assert!(g.may_contact(uid("@a:x.example"), uid("@b:x.example")));
        assert!(g.may_contact(uid("@a:x.example"), uid("@p:chat.partner.example")));
        assert!(g.may_contact(uid("@p:chat.partner.example"), uid("@a:x.example")));
        // A server entry names the host whatever the port.
        assert!(g.may_contact(uid("@a:x.example"), uid("@p:chat.partner.example:8448")));
        assert!(!g.may_contact(uid("@a:x.example"), uid("@z:board.example")));
        assert!(g.may_contact(uid("@boss:x.example"), uid("@z:board.example")));
        assert!(!g.may_contact(uid("@a:x.example"), uid("@o:other.example")));
        assert!(g.may_contact(uid("@o:other.example"), uid("@o:other.example")));
        g.create("ops").expect("create");
        g.change_member("ops", "other.example", true)
            .expect("add server");
        g.change_member("ops", "@a:x.example", true)
            .expect("add user");
        assert!(g.may_contact(uid("@a:x.example"), uid("@o:other.example")));
        assert!(g.create("staff").is_err());
        // Runtime groups survive a restart.
        let again = Groups::new(storage, &c).expect("groups");
        assert!(again.is_member("ops", uid("@o:other.example")));
        again
            .change_member("ops", "other.example", false)
            .expect("remove");
        assert!(!again.is_member("ops", uid("@o:other.example")));
        assert!(validate(&c.groups, &[["staff".into(), "nope".into()]]).is_err());
    }
}
