//! The configuration reference (docs/configuration.md) and the example config must name every key
//! of the config struct, and loading must behave as documented.

use hafen::config::{from_toml_str, Config};

#[test]
fn config_reference_lists_every_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
    let example = std::fs::read_to_string(format!("{root}/conduit-config.toml")).unwrap();
    let keys = Config::all_key_paths();
    assert!(keys.len() >= 20, "{keys:?}");
    for key in &keys {
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/configuration.md does not document `{key}`"
        );
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            example.contains(leaf),
            "conduit-config.toml does not mention `{key}`"
        );
    }
}

#[test]
fn example_config_is_the_default_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let example = std::fs::read_to_string(format!("{root}/conduit-config.toml")).unwrap();
    let loaded = from_toml_str(&example, Vec::new()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let defaults = Config::default();
    assert_eq!(
        toml::to_string(&loaded.config).unwrap(),
        toml::to_string(&defaults).unwrap(),
        "conduit-config.toml must show the defaults"
    );
}
