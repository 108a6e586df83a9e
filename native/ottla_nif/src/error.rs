//! The one error type of the NIF. It reaches Elixir as
//! `{:error, %Ottla.Error{code: atom, message: binary, retriable?: boolean}}`. No message
//! shows the value of a secret property (`config::is_secret`).

use ottla_core::errors::{is_retriable, snake_case};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::config;

/// An error to hand back to Elixir. `code` is a snake_case atom name, e.g. `unknown_topic_or_partition`.
#[derive(Debug, Clone)]
pub struct Error {
    pub code: String,
    pub message: String,
    pub retriable: bool,
    /// For a message that failed: whether it may have been written all the same.
    pub possibly_persisted: bool,
}

impl Error {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Error {
            code: code.to_string(),
            message: message.into(),
            retriable: is_retriable(code),
            possibly_persisted: false,
        }
    }

    pub fn possibly_persisted(mut self, possibly: bool) -> Self {
        self.possibly_persisted = possibly;
        self
    }

    /// An error carrying a librdkafka error code.
    pub fn from_code(code: RDKafkaErrorCode, message: impl Into<String>) -> Self {
        Self::new(&code_name(code), message)
    }
}

impl From<KafkaError> for Error {
    fn from(err: KafkaError) -> Self {
        let code = match (&err, err.rdkafka_error_code()) {
            (_, Some(code)) => code_name(code),
            (KafkaError::AdminOp(code), None) => code_name(*code),
            (KafkaError::ClientConfig(..), None) => "invalid_config".to_string(),
            (KafkaError::ClientCreation(_), None) => "client_creation".to_string(),
            (KafkaError::Canceled, None) => "canceled".to_string(),
            _ => "kafka_error".to_string(),
        };
        let message = match &err {
            // rdkafka's message for a refused property ends with the value it was given.
            KafkaError::ClientConfig(_, description, key, value) if config::is_secret(key) => {
                format!(
                    "Client config error: {} {key} {}",
                    config::without_value(description, value),
                    config::REDACTED
                )
            }
            _ => err.to_string(),
        };
        Error::new(&code, message)
    }
}

impl Encoder for Error {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let code = Atom::from_str(env, &self.code)
            .unwrap_or_else(|_| Atom::from_str(env, "kafka_error").unwrap_or(atoms::error()));
        let keys = [
            atoms::struct_().encode(env),
            atoms::exception().encode(env),
            atoms::code().encode(env),
            atoms::message().encode(env),
            atoms::retriable().encode(env),
            atoms::possibly_persisted().encode(env),
        ];
        let values = [
            atoms::ottla_error().encode(env),
            true.encode(env),
            code.encode(env),
            self.message.encode(env),
            self.retriable.encode(env),
            self.possibly_persisted.encode(env),
        ];
        // Keys are distinct atoms, so building the map cannot fail; fall back to a tuple anyway.
        Term::map_from_arrays(env, &keys, &values)
            .unwrap_or_else(|_| (code, self.message.as_str()).encode(env))
    }
}

impl From<Error> for rustler::Error {
    fn from(err: Error) -> Self {
        rustler::Error::Term(Box::new(err))
    }
}

/// `RDKafkaErrorCode::UnknownTopicOrPartition` → `"unknown_topic_or_partition"`.
pub fn code_name(code: RDKafkaErrorCode) -> String {
    snake_case(&format!("{code:?}"))
}

pub type Result<T> = std::result::Result<T, Error>;
