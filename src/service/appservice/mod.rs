//! Application services (bridges): their registrations, who they are when they call the client
//! API, which ids they own, and which events interest them.
//!
//! Registrations come from the YAML files named in `app_service_config_files` (checked at start:
//! a bad file stops the server with a message naming the file and the field) and from the admin
//! API (`/_hafen/admin/v1/appservices`, kept in `appservice_registrations`, effective at once).
//! The list is replaced as a whole when it changes (copy on write), so the event write path reads
//! it without taking a lock for long. Tokens are kept only as SHA-256 hashes in memory lookups and
//! never logged; the registration itself (which the appservice needs back) is stored as given.
//!
//! Delivery of events is in [`queue`], outgoing requests (transactions, queries, ping,
//! third-party lookups) in [`client`].

pub mod client;
pub mod ephemeral;
pub mod query;
pub mod queue;
pub mod registration;
pub mod thirdparty;

use std::{collections::HashSet, sync::Arc};

use parking_lot::RwLock;
use ruma::{OwnedUserId, RoomId, ServerName, UserId};

use self::registration::{CompiledNamespaces, Registration};
use crate::{
    error::{Error, Result},
    service::rooms::pdu::Pdu,
    storage::{Batch, Storage, Table},
    utils,
};

/// Where a registration came from.
pub const SOURCE_ADMIN_API: &str = "admin_api";

/// One registered appservice.
#[derive(Debug)]
pub struct Appservice {
    pub registration: Registration,
    pub namespaces: CompiledNamespaces,
    /// `@sender_localpart:server`: who the appservice is when it does not assert a user.
    pub sender: OwnedUserId,
    /// The file it was read from, or [`SOURCE_ADMIN_API`].
    pub source: String,
    as_token_hash: Vec<u8>,
}

impl Appservice {
    pub fn new(
        registration: Registration,
        source: String,
        server: &ServerName,
    ) -> Result<Self, String> {
        let namespaces = registration.validate()?;
        let sender = UserId::parse(format!("@{}:{server}", registration.sender_localpart))
            .map_err(|e| format!("field `sender_localpart`: {e}"))?;
        Ok(Appservice {
            as_token_hash: utils::token_hash(&registration.as_token),
            registration,
            namespaces,
            sender,
            source,
        })
    }

    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// Whether the appservice may act as `user`: its sender or a user in its namespaces (local).
    pub fn owns_user(&self, user: &UserId) -> bool {
        *user == self.sender
            || (user.server_name() == self.sender.server_name()
                && CompiledNamespaces::matches(&self.namespaces.users, user.as_str()))
    }

    pub fn owns_alias(&self, alias: &str) -> bool {
        CompiledNamespaces::matches(&self.namespaces.aliases, alias)
    }

    pub fn declares_protocol(&self, protocol: &str) -> bool {
        self.registration
            .protocols
            .as_ref()
            .is_some_and(|p| p.iter().any(|x| x == protocol))
    }

    /// Whether an event interests the appservice: its sender or (membership) target is one of its
    /// users, the room is in its room namespace, one of the room's aliases is in its alias
    /// namespace, or one of its users is joined.
    fn interested_in(
        &self,
        room_id: &RoomId,
        pdu: &Pdu,
        joined: &HashSet<OwnedUserId>,
        aliases: &mut dyn FnMut() -> Result<Arc<Vec<String>>>,
    ) -> Result<bool> {
        if self.owns_user(&pdu.sender) {
            return Ok(true);
        }
        if let Some(target) = pdu
            .state_key
            .as_deref()
            .filter(|_| pdu.kind == ruma::events::TimelineEventType::RoomMember)
            .and_then(|k| UserId::parse(k).ok())
        {
            if self.owns_user(&target) {
                return Ok(true);
            }
        }
        self.interested_in_room(room_id, joined, aliases)
    }

    /// Whether the room itself interests the appservice (room or alias namespace, or a joined
    /// member in its user namespace).
    fn interested_in_room(
        &self,
        room_id: &RoomId,
        joined: &HashSet<OwnedUserId>,
        aliases: &mut dyn FnMut() -> Result<Arc<Vec<String>>>,
    ) -> Result<bool> {
        if CompiledNamespaces::matches(&self.namespaces.rooms, room_id.as_str()) {
            return Ok(true);
        }
        if !self.namespaces.aliases.is_empty() && aliases()?.iter().any(|a| self.owns_alias(a)) {
            return Ok(true);
        }
        Ok(joined.iter().any(|u| self.owns_user(u)))
    }
}

/// The registered appservices and what they need at run time.
pub struct Appservices {
    storage: Storage,
    server_name: ruma::OwnedServerName,
    list: RwLock<Arc<Vec<Arc<Appservice>>>>,
    pub client: client::Client,
    pub queue: queue::Queue,
}

impl Appservices {
    /// Read the configured registration files and the ones the admin API stored. A bad file, or
    /// two registrations with the same id or `as_token`, is an error naming the file.
    pub fn load(config: &crate::config::Config, storage: Storage) -> Result<Appservices> {
        let server = &config.server_name;
        let mut list: Vec<Arc<Appservice>> = Vec::new();
        for path in &config.app_service_config_files {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::internal(format!("app_service_config_files: cannot read {name}: {e}"))
            })?;
            let reg = Registration::from_yaml(&text)
                .map_err(|e| Error::internal(format!("app_service_config_files: {name}: {e}")))?;
            let a = Appservice::new(reg, name.clone(), server)
                .map_err(|e| Error::internal(format!("app_service_config_files: {name}: {e}")))?;
            if let Some(clash) = clash(&list, &a) {
                return Err(Error::internal(format!(
                    "app_service_config_files: {name}: {clash}"
                )));
            }
            list.push(Arc::new(a));
        }
        for entry in storage.scan_prefix(Table::AppserviceRegistrations, b"")? {
            let (_, v) = entry?;
            let reg: Registration = serde_json::from_slice(&v)?;
            let id = reg.id.clone();
            match Appservice::new(reg, SOURCE_ADMIN_API.to_owned(), server) {
                Ok(a) => match clash(&list, &a) {
                    // A file now registers the same bridge: the file wins, the stored copy waits.
                    Some(c) => tracing::warn!("appservice {id} (admin API) ignored: {c}"),
                    None => list.push(Arc::new(a)),
                },
                Err(e) => tracing::warn!("appservice {id} (admin API) ignored: {e}"),
            }
        }
        Ok(Appservices {
            client: client::Client::new()?,
            queue: queue::Queue::new(storage.clone())?,
            storage,
            server_name: server.clone(),
            list: RwLock::new(Arc::new(list)),
        })
    }

    pub fn all(&self) -> Arc<Vec<Arc<Appservice>>> {
        self.list.read().clone()
    }

    pub fn is_empty(&self) -> bool {
        self.list.read().is_empty()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Appservice>> {
        self.all().iter().find(|a| a.id() == id).cloned()
    }

    /// The appservice whose `as_token` this is.
    pub fn by_token(&self, token: &str) -> Option<Arc<Appservice>> {
        let list = self.all();
        if list.is_empty() {
            return None;
        }
        let hash = utils::token_hash(token);
        list.iter().find(|a| a.as_token_hash == hash).cloned()
    }

    /// An appservice that claims `user` exclusively (other than `except`).
    pub fn exclusive_user_owner(&self, user: &UserId) -> Option<Arc<Appservice>> {
        self.all()
            .iter()
            .find(|a| {
                user.server_name() == a.sender.server_name()
                    && CompiledNamespaces::matches_exclusive(&a.namespaces.users, user.as_str())
            })
            .cloned()
    }

    /// An appservice that claims `alias` exclusively.
    pub fn exclusive_alias_owner(&self, alias: &str) -> Option<Arc<Appservice>> {
        self.all()
            .iter()
            .find(|a| CompiledNamespaces::matches_exclusive(&a.namespaces.aliases, alias))
            .cloned()
    }

    /// The appservice acting for `user`, when `user` is its sender or in its user namespace.
    pub fn owner_of_user(&self, user: &UserId) -> Option<Arc<Appservice>> {
        self.all().iter().find(|a| a.owns_user(user)).cloned()
    }

    /// 400 `M_EXCLUSIVE` when `user` lies in an appservice's exclusive namespace and `actor` is
    /// not that appservice.
    pub fn ensure_user_not_exclusive(&self, user: &UserId, actor: Option<&str>) -> Result<()> {
        match self.exclusive_user_owner(user) {
            Some(a) if Some(a.id()) != actor => Err(Error::new(
                crate::error::ErrCode::Exclusive,
                "This user id is reserved by an application service",
            )),
            _ => Ok(()),
        }
    }

    /// 400 `M_EXCLUSIVE` when `alias` lies in an appservice's exclusive namespace and `creator`
    /// is not one of that appservice's users.
    pub fn ensure_alias_not_exclusive(&self, alias: &str, creator: &UserId) -> Result<()> {
        match self.exclusive_alias_owner(alias) {
            Some(a) if !a.owns_user(creator) => Err(Error::new(
                crate::error::ErrCode::Exclusive,
                "This room alias is reserved by an application service",
            )),
            _ => Ok(()),
        }
    }

    /// Queue the event for every appservice it interests, in the event's batch; returns their
    /// ids (to wake the sender once the batch is durable). Costs nothing without appservices.
    pub fn queue_event(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        pdu: &Pdu,
        joined: &HashSet<OwnedUserId>,
        count: u64,
        aliases: &dyn Fn() -> Result<Vec<String>>,
    ) -> Result<Vec<String>> {
        let list = self.all();
        if list.is_empty() {
            return Ok(Vec::new());
        }
        let mut aliases = read_once(aliases);
        let mut out = Vec::new();
        // One without a URL only uses the client API: nothing is pushed to it.
        for a in list.iter().filter(|a| a.registration.url.is_some()) {
            if a.interested_in(room_id, pdu, joined, &mut aliases)? {
                queue::queue_event(batch, a.id(), count, &pdu.event_id)?;
                out.push(a.id().to_owned());
            }
        }
        Ok(out)
    }

    /// The appservices that want ephemeral events of a room.
    pub fn ephemeral_for_room(
        &self,
        room_id: &RoomId,
        joined: &HashSet<OwnedUserId>,
        aliases: &dyn Fn() -> Result<Vec<String>>,
    ) -> Result<Vec<Arc<Appservice>>> {
        let list = self.all();
        let mut aliases = read_once(aliases);
        let mut out = Vec::new();
        for a in list
            .iter()
            .filter(|a| a.registration.wants_ephemeral() && a.registration.url.is_some())
        {
            if a.interested_in_room(room_id, joined, &mut aliases)? {
                out.push(a.clone());
            }
        }
        Ok(out)
    }

    /// Register an appservice through the admin API: validated like a file, stored, effective at
    /// once. Errors: 400 `M_INVALID_PARAM` naming the field or the clash.
    pub fn add(&self, registration: Registration) -> Result<Arc<Appservice>> {
        let a = Appservice::new(registration, SOURCE_ADMIN_API.to_owned(), &self.server_name)
            .map_err(Error::invalid_param)?;
        let mut list = self.list.write();
        if let Some(c) = clash(&list, &a) {
            return Err(Error::invalid_param(c));
        }
        self.storage.put(
            Table::AppserviceRegistrations,
            a.id().as_bytes(),
            &serde_json::to_vec(&a.registration)?,
        )?;
        let a = Arc::new(a);
        let mut next = (**list).clone();
        next.push(a.clone());
        *list = Arc::new(next);
        Ok(a)
    }

    /// Remove an appservice registered through the admin API, with its queue. Ones from a file
    /// stay (400 `M_INVALID_PARAM`); unknown ids are 404 `M_NOT_FOUND`.
    pub fn remove(&self, id: &str) -> Result<Arc<Appservice>> {
        let mut list = self.list.write();
        let Some(a) = list.iter().find(|a| a.id() == id).cloned() else {
            return Err(Error::not_found("No such appservice"));
        };
        if a.source != SOURCE_ADMIN_API {
            return Err(Error::invalid_param(format!(
                "This appservice is registered by the file {}; remove it there",
                a.source
            )));
        }
        let mut batch = self.storage.batch();
        batch.delete(Table::AppserviceRegistrations, id.as_bytes())?;
        batch.commit()?;
        self.queue.drop_queue(id)?;
        *list = Arc::new(list.iter().filter(|x| x.id() != id).cloned().collect());
        Ok(a)
    }
}

/// Why `a` cannot join `list`: the same id or the same `as_token` as a registered one.
fn clash(list: &[Arc<Appservice>], a: &Appservice) -> Option<String> {
    for b in list {
        if b.id() == a.id() {
            return Some(format!(
                "field `id`: {} is already registered ({})",
                a.id(),
                b.source
            ));
        }
        if b.as_token_hash == a.as_token_hash {
            return Some(format!(
                "field `as_token`: the same token as appservice {} ({})",
                b.id(),
                b.source
            ));
        }
    }
    None
}

/// Create the appservice's sender user if it does not exist yet (it exists from registration on).
pub fn ensure_sender(services: &crate::service::Services, a: &Appservice) -> Result<()> {
    if !services.accounts.exists(&a.sender)? {
        services
            .accounts
            .create_user(&a.sender, None, false, false)?;
        crate::service::profile_defaults(services, &a.sender)?;
    }
    Ok(())
}

/// `aliases` read at most once, on first use (many appservices may ask about the same room).
fn read_once(
    aliases: &dyn Fn() -> Result<Vec<String>>,
) -> impl FnMut() -> Result<Arc<Vec<String>>> + '_ {
    let mut cached: Option<Arc<Vec<String>>> = None;
    move || {
        if cached.is_none() {
            cached = Some(Arc::new(aliases()?));
        }
        Ok(cached.clone().unwrap_or_default())
    }
}
