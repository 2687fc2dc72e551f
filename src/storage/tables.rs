//! The named tables (column families) and what their keys and values are.
//! Key layouts use `0xff` as separator (it never occurs in UTF-8) and big-endian u64 counts, so
//! byte order equals logical order.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// "counter" -> u64: the global stream position; "signing_key" -> pkcs8 ed25519 key.
    Global,
    /// localpart -> JSON `UserRecord` (password hash, admin, deactivated, created).
    Users,
    /// sha256(access token) -> JSON `TokenRecord` (user, device, expiry).
    AccessTokens,
    /// sha256(refresh token) -> JSON `RefreshRecord`.
    RefreshTokens,
    /// user 0xff device_id -> JSON `DeviceRecord`.
    Devices,
    /// token -> JSON `RegistrationToken` (uses allowed, completed, expiry).
    RegistrationTokens,
    /// user 0xff room ("" for global) 0xff type -> content JSON.
    AccountData,
    /// user 0xff count -> room 0xff type: which account data changed when (incremental sync).
    AccountDataLog,
    /// user 0xff filter id -> filter JSON.
    Filters,
    /// user 0xff key ("displayname"/"avatar_url"/custom) -> JSON value.
    Profile,
    /// event id -> PDU JSON as stored (canonical, signed).
    Pdus,
    /// event id -> JSON `EventMeta` (room, stream count, transaction of the sender, redacted).
    EventMeta,
    /// room 0xff count -> event id: the timeline in stream order.
    Timeline,
    /// room -> JSON `RoomMeta` (version, creators, forward extremity, depth).
    Rooms,
    /// room 0xff type 0xff state_key -> event id: current state.
    RoomState,
    /// room 0xff count -> JSON (type, state_key, event id, previous event id): state changes.
    StateLog,
    /// room 0xff type 0xff state_key 0xff count -> event id (empty: the key left the state): the
    /// state log again, by key, so the state at any position is a seek per key rather than a
    /// replay of the room's history (`Rooms::state_at`, `state_get_at`).
    StateByKey,
    /// room 0xff user -> membership string: current membership of every user ever in the room.
    RoomMembers,
    /// user 0xff room -> JSON (membership, count): rooms of a user, for sync.
    UserRooms,
    /// user 0xff room 0xff count -> membership: membership history (history visibility).
    MembershipLog,
    /// user 0xff device 0xff txn id -> event id: transaction idempotency per device.
    Transactions,
    /// alias -> room id.
    Aliases,
    /// room 0xff alias -> creator user id.
    RoomAliases,
    /// room -> "" for rooms published in the directory.
    PublicRooms,
    /// room 0xff receipt type 0xff thread 0xff user -> JSON (event id, ts, count).
    Receipts,
    /// room 0xff count -> user 0xff receipt type 0xff thread: which receipts changed when.
    ReceiptLog,
    /// user -> JSON presence state.
    Presence,
    /// user 0xff device -> device keys JSON as the device uploaded them.
    DeviceKeys,
    /// user 0xff device 0xff algorithm 0xff key id -> one-time key JSON (deleted when claimed).
    OneTimeKeys,
    /// user 0xff device -> JSON {algorithm: unclaimed count}.
    OneTimeKeyCounts,
    /// user 0xff device 0xff algorithm -> JSON (key id, key, used).
    FallbackKeys,
    /// user 0xff master|self_signing|user_signing -> key JSON.
    CrossSigningKeys,
    /// target user 0xff key id 0xff signer 0xff signer key id -> signature added by /keys/signatures/upload.
    KeySignatures,
    /// count -> JSON list of device-list changes (keys changed; joined or left a room).
    DeviceListLog,
    /// user 0xff device 0xff count sender 0xff sender device -> to-device message JSON.
    ToDevice,
    /// user 0xff version -> JSON backup version (algorithm, auth_data, etag, count); "next" 0xff user -> next version number.
    BackupVersions,
    /// user 0xff version room 0xff session -> backed-up session key JSON.
    BackupKeys,
    /// arrival time (ms) and a sequence number, both big-endian -> JSON report of a room, event or user.
    Reports,
    /// sha256(OpenID token) -> JSON (user, expiry).
    OpenIdTokens,
    /// parent event id 0xff count -> JSON (child event id, rel_type, type): `m.relates_to` index.
    Relations,
    /// user 0xff count -> JSON `Notification` (room, event, actions, highlight, ts): what the
    /// user's push rules said about an event, for `/notifications` and push gateways.
    Notifications,
    /// user 0xff room 0xff count -> JSON (highlight, thread root): notifications the user has
    /// not read yet; a read receipt deletes those up to its event. Unread counts come from here.
    PushUnread,
    /// user 0xff app id 0xff pushkey -> JSON pusher (as set by the client, plus delivery cursor).
    Pushers,
    /// room 0xff count -> thread root event id: threads by their latest reply (one entry per
    /// thread; a new reply moves it).
    Threads,
    /// room 0xff root event id -> JSON `ThreadRecord`: latest reply (event and count, where its
    /// `Threads` entry is), number of replies, who replied.
    ThreadRoots,
    /// user -> JSON (device id, device data): the user's dehydrated device (MSC3814).
    DehydratedDevices,
    /// server name -> the server's own key document (`/_matrix/key/v2/server`), verified,
    /// kept until its `valid_until_ts`.
    RemoteServerKeys,
    /// server name 0xff media id -> JSON `MediaRecord` (uploader, times, and once uploaded: sha256,
    /// size, content type, filename). A record without upload is a pending `/create`.
    Media,
    /// uploader 0xff server name 0xff media id -> "": a user's media (retention, erasure).
    MediaByUser,
    /// uploader 0xff server name 0xff media id -> big-endian expiry (ms): pending `/create`s.
    MediaPending,
    /// sha256 (hex) 0xff server name 0xff media id -> "": which media use a stored file (erasure
    /// deletes the file when the last one goes).
    MediaFileRefs,
    /// source sha256 (hex) 0xff width 0xff height 0xff method -> JSON `ThumbnailRecord`.
    MediaThumbnails,
    /// event id -> JSON list of [type, state_key, event id]: the room state just before the event,
    /// kept only where it is not the room's state log at the event's count (events joined into a
    /// fork, the join event of a room joined over federation, outliers with known state).
    EventState,
    /// destination server 0xff kind byte (`p` PDU, `e` EDU) 0xff big-endian sequence -> JSON
    /// queue item: what is still to be sent to a server, deleted once it acknowledged it.
    FederationQueue,
    /// origin server 0xff transaction id -> JSON answer: incoming `/send` transactions already
    /// processed (a retried transaction gets the same answer and is not applied twice).
    FederationTxns,
    /// room 0xff big-endian sequence -> event id: history fetched from other servers
    /// (`/backfill`), older than the room's first timeline event; a higher sequence is older.
    /// room -> JSON `BackfillMeta` (next sequence, backward extremities still to fetch).
    Backfill,
    /// event id -> big-endian sequence: the events in `backfill`.
    BackfillIndex,
    /// big-endian time (ms) and sequence number -> JSON `AuditEntry`: the append-only audit log.
    AuditLog,
    /// user 0xff audit key -> "": the audit entries about a user.
    AuditByUser,
    /// group name -> JSON `GroupConfig`: closed user groups made through the admin API.
    Groups,
    /// kind (`federation`, `push_gateway`) 0xff destination -> JSON `DestinationRecord` (first
    /// and last contact, count): the register of third-party services contacted.
    ContactRegister,
    /// appservice id -> JSON registration: appservices registered through the admin API.
    AppserviceRegistrations,
    /// appservice id 0xff kind (`p` event, `e` ephemeral) 0xff big-endian sequence -> event id
    /// (`p`, the sequence is the event's stream count) or ephemeral event JSON (`e`): what is
    /// still to be pushed to an appservice, deleted once it acknowledged the transaction.
    AppserviceQueue,
    /// appservice id -> JSON (next transaction number, the transaction in flight and the items it
    /// carries): a failed transaction is sent again unchanged, also after a restart.
    AppserviceTxns,
    /// sha256(login token) -> JSON `LoginTokenRecord` (user, expiry, method): the one-time
    /// tokens of `m.login.token`, deleted when used.
    LoginTokens,
    /// idp id 0xff subject -> user id: which account an identity provider's user logs into.
    SsoSubjects,
    /// user 0xff idp id -> subject: the same links by user (erasure deletes them).
    SsoUserSubjects,
    /// user -> JSON `ClaimsRecord`: the groups the identity provider named at the user's latest
    /// SSO or JWT login (policy: closed user groups).
    IdpClaims,
    /// room 0xff `b` 0xff backfill sequence -> event id: the history visibility events of the
    /// backfilled history (the timeline's changes are the `state_by_key` rows of
    /// `m.room.history_visibility`). What a user may see of an event is judged by the setting in
    /// force at it (`rooms/visibility.rs`).
    VisibilityLog,
}

impl Table {
    pub const ALL: &'static [Table] = &[
        Table::Global,
        Table::Users,
        Table::AccessTokens,
        Table::RefreshTokens,
        Table::Devices,
        Table::RegistrationTokens,
        Table::AccountData,
        Table::AccountDataLog,
        Table::Filters,
        Table::Profile,
        Table::Pdus,
        Table::EventMeta,
        Table::Timeline,
        Table::Rooms,
        Table::RoomState,
        Table::StateLog,
        Table::StateByKey,
        Table::RoomMembers,
        Table::UserRooms,
        Table::MembershipLog,
        Table::Transactions,
        Table::Aliases,
        Table::RoomAliases,
        Table::PublicRooms,
        Table::Receipts,
        Table::ReceiptLog,
        Table::Presence,
        Table::DeviceKeys,
        Table::OneTimeKeys,
        Table::OneTimeKeyCounts,
        Table::FallbackKeys,
        Table::CrossSigningKeys,
        Table::KeySignatures,
        Table::DeviceListLog,
        Table::ToDevice,
        Table::BackupVersions,
        Table::BackupKeys,
        Table::Reports,
        Table::OpenIdTokens,
        Table::Relations,
        Table::Notifications,
        Table::PushUnread,
        Table::Pushers,
        Table::Threads,
        Table::ThreadRoots,
        Table::DehydratedDevices,
        Table::RemoteServerKeys,
        Table::Media,
        Table::MediaByUser,
        Table::MediaPending,
        Table::MediaFileRefs,
        Table::MediaThumbnails,
        Table::EventState,
        Table::FederationQueue,
        Table::FederationTxns,
        Table::AuditLog,
        Table::AuditByUser,
        Table::ContactRegister,
        Table::Backfill,
        Table::BackfillIndex,
        Table::Groups,
        Table::AppserviceRegistrations,
        Table::AppserviceQueue,
        Table::AppserviceTxns,
        Table::LoginTokens,
        Table::SsoSubjects,
        Table::SsoUserSubjects,
        Table::IdpClaims,
        Table::VisibilityLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Global => "global",
            Table::Users => "users",
            Table::AccessTokens => "access_tokens",
            Table::RefreshTokens => "refresh_tokens",
            Table::Devices => "devices",
            Table::RegistrationTokens => "registration_tokens",
            Table::AccountData => "account_data",
            Table::AccountDataLog => "account_data_log",
            Table::Filters => "filters",
            Table::Profile => "profile",
            Table::Pdus => "pdus",
            Table::EventMeta => "event_meta",
            Table::Timeline => "timeline",
            Table::Rooms => "rooms",
            Table::RoomState => "room_state",
            Table::StateLog => "state_log",
            Table::StateByKey => "state_by_key",
            Table::RoomMembers => "room_members",
            Table::UserRooms => "user_rooms",
            Table::MembershipLog => "membership_log",
            Table::Transactions => "transactions",
            Table::Aliases => "aliases",
            Table::RoomAliases => "room_aliases",
            Table::PublicRooms => "public_rooms",
            Table::Receipts => "receipts",
            Table::ReceiptLog => "receipt_log",
            Table::Presence => "presence",
            Table::DeviceKeys => "device_keys",
            Table::OneTimeKeys => "one_time_keys",
            Table::OneTimeKeyCounts => "one_time_key_counts",
            Table::FallbackKeys => "fallback_keys",
            Table::CrossSigningKeys => "cross_signing_keys",
            Table::KeySignatures => "key_signatures",
            Table::DeviceListLog => "device_list_log",
            Table::ToDevice => "to_device",
            Table::BackupVersions => "backup_versions",
            Table::BackupKeys => "backup_keys",
            Table::Reports => "reports",
            Table::OpenIdTokens => "openid_tokens",
            Table::Relations => "relations",
            Table::Notifications => "notifications",
            Table::PushUnread => "push_unread",
            Table::Pushers => "pushers",
            Table::Threads => "threads",
            Table::ThreadRoots => "thread_roots",
            Table::DehydratedDevices => "dehydrated_devices",
            Table::RemoteServerKeys => "remote_server_keys",
            Table::Media => "media",
            Table::MediaByUser => "media_by_user",
            Table::MediaPending => "media_pending",
            Table::MediaFileRefs => "media_file_refs",
            Table::MediaThumbnails => "media_thumbnails",
            Table::EventState => "event_state",
            Table::FederationQueue => "federation_queue",
            Table::FederationTxns => "federation_txns",
            Table::AuditLog => "audit_log",
            Table::AuditByUser => "audit_by_user",
            Table::ContactRegister => "contact_register",
            Table::Backfill => "backfill",
            Table::BackfillIndex => "backfill_index",
            Table::Groups => "groups",
            Table::AppserviceRegistrations => "appservice_registrations",
            Table::AppserviceQueue => "appservice_queue",
            Table::AppserviceTxns => "appservice_txns",
            Table::LoginTokens => "login_tokens",
            Table::SsoSubjects => "sso_subjects",
            Table::SsoUserSubjects => "sso_user_subjects",
            Table::IdpClaims => "idp_claims",
            Table::VisibilityLog => "visibility_log",
        }
    }
}
