//! Integration tests: the real server, started in-process on 127.0.0.1:0 with a temporary RocksDB,
//! driven over real HTTP. One test binary (modules below) so the server is linked once.

mod common;

mod config;
mod crash;
mod accounts;
mod discovery;
mod sdk_client;
mod rooms;
mod sync;
mod history;
mod directory;
