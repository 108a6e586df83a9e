//! [`Position`]: a place in a partition, as Elixir names it everywhere (the consumer's start
//! and seeks, assign mode's `:begin_offset`, fetch): `:earliest | :latest | {:offset, n}`.
//! Nothing else crosses the boundary as an offset with a special meaning.

use ottla_core::partition::{OFFSET_BEGINNING, OFFSET_END};
use rustler::NifResult;

#[derive(rustler::NifTaggedEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// The log start.
    Earliest,
    /// The log end (the high watermark): only what comes next.
    Latest,
    /// An offset (never negative).
    Offset(i64),
}

impl Position {
    /// The partition state machine's offset: an offset, or its named logical offsets.
    pub fn offset(self) -> NifResult<i64> {
        match self {
            Position::Earliest => Ok(OFFSET_BEGINNING),
            Position::Latest => Ok(OFFSET_END),
            Position::Offset(n) if n >= 0 => Ok(n),
            Position::Offset(_) => Err(rustler::Error::BadArg),
        }
    }

    /// librdkafka's offset.
    pub fn kafka(self) -> NifResult<rdkafka::Offset> {
        Ok(match self.offset()? {
            OFFSET_BEGINNING => rdkafka::Offset::Beginning,
            OFFSET_END => rdkafka::Offset::End,
            n => rdkafka::Offset::Offset(n),
        })
    }
}
