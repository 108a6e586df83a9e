//! Turns the options Elixir validated into a librdkafka `ClientConfig`.

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
