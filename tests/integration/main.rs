//! Integration tests: the real server, started in-process on 127.0.0.1:0 with a temporary RocksDB,
//! driven over real HTTP. One test binary (modules below) so the server is linked once.

mod common;

mod accounts;
mod appservice;
mod at_rest;
mod audit;
mod backup;
mod config;
mod crash;
mod directory;
mod discovery;
mod e2ee;
mod erasure;
mod federation_auth;
mod federation_e2ee;
mod federation_events;
mod federation_hostile;
mod federation_keys;
mod federation_rooms;
mod federation_send;
mod federation_tls;
mod groups;
mod history;
mod hostile_peer;
mod media;
mod push;
mod relations;
mod reports;
mod retention;
mod rooms;
mod schema;
mod sdk_client;
mod sdk_e2ee;
mod search;
mod sliding_sync;
mod space;
mod sso;
mod synapse;
mod synapse_rooms;
mod sync;
mod transparency;
mod user_directory;
mod voip;
