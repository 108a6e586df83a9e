defmodule Ottla.Message do
  @moduledoc """
  A message read from Kafka.

    * `:topic`, `:partition`, `:offset` - where it was read.
    * `:key`, `:value` - binaries, or `nil` when the record has none.
    * `:timestamp` - milliseconds since the epoch, or `nil`.
    * `:headers` - `[{name, value}]` in record order.
    * `:generation_id` - the consumer group generation it was delivered in (`nil` when read
      outside a group, e.g. by `Ottla.fetch/3`). Acks carry it, see `Ottla.Group.Acknowledger`.

  ## Example

      iex> %Ottla.Message{topic: "orders", partition: 0, offset: 41, value: "hi"}.offset
      41
  """

  defstruct [:topic, :partition, :offset, :key, :value, :timestamp, :generation_id, headers: []]

  @type t :: %__MODULE__{
          topic: String.t(),
          partition: non_neg_integer,
          offset: non_neg_integer,
          key: binary | nil,
          value: binary | nil,
          timestamp: integer | nil,
          headers: [{binary, binary | nil}],
          generation_id: integer | nil
        }
end
