//! Turns the options Elixir validated into a librdkafka `ClientConfig`, and knows which
//! properties hold secrets, so that no error the NIF reports shows their values.

use rdkafka::config::ClientConfig;

/// `bootstrap` is a `host:port,host:port` list; `props` are librdkafka properties, already
/// stringified by Elixir. Later entries win, so Ottla's defaults come first.
pub fn client_config(bootstrap: &str, props: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config.set("client.id", "ottla");
    for (key, value) in props {
        config.set(key, value);
    }
    config
}

/// The librdkafka properties whose values are secrets. The same list is
/// `Ottla.Secrets.properties/0` (lib/ottla/secrets.ex); a test keeps the two equal. Besides
/// these, any dotted property name containing one of [`SECRET_WORDS`] counts as a secret.
pub const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
];

/// Words that make any dotted property name a secret one (librdkafka may add such properties).
pub const SECRET_WORDS: &[&str] = &["password", "secret", "passphrase"];

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Whether `key` names a property whose value must never be shown.
pub fn is_secret(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    SECRET_PROPERTIES.contains(&key.as_str())
        || (key.contains('.') && SECRET_WORDS.iter().any(|w| key.contains(w)))
}

/// `text` with every occurrence of the secret `value` replaced.
pub fn without_value(text: &str, value: &str) -> String {
    if value.is_empty() {
        text.to_string()
    } else {
        text.replace(value, REDACTED)
    }
}
