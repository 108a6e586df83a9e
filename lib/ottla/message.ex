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

  ## brod's records

  Ottla delivers `%Ottla.Message{}` structs. Code that still sees brod's `kafka_message`
  records (from brod itself, or from tests written for Elsa) can read them with the record
  macros this module defines, as `Elsa.Message` exported them, and turn them into structs
  with `new/2`:

      iex> require Ottla.Message
      iex> record = Ottla.Message.kafka_message(offset: 7, key: "k", value: "v", ts: 1_700_000_000_000)
      iex> Ottla.Message.kafka_message(record, :value)
      "v"
      iex> Ottla.Message.new(record, topic: "orders", partition: 2).offset
      7
  """

  require Record

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

  # kafka_protocol's record (kpro_public.hrl), field for field: brod's messages are these.
  Record.defrecord(:kafka_message,
    offset: :undefined,
    key: :undefined,
    value: :undefined,
    ts_type: :undefined,
    ts: :undefined,
    headers: []
  )

  @typedoc "brod's (kafka_protocol's) `#kafka_message{}` record."
  @type kafka_message ::
          record(:kafka_message,
            offset: integer,
            key: binary | :undefined,
            value: binary | :undefined,
            ts_type: :create | :append | :undefined,
            ts: integer | :undefined,
            headers: [{binary, binary}]
          )

  @doc """
  Builds a message from a brod `kafka_message` record, as `Elsa.Message.new/2` did, with
  where it was read from.

  brod has no null key or value (it reads both as `""`): they stay `""`. A timestamp brod
  left `:undefined` becomes `nil`.

  ## Options

    * `:topic` - the topic it was read from. Required.
    * `:partition` - the partition it was read from. Required.
    * `:generation_id` - the consumer group generation, or `nil`. Defaults to `nil`.
  """
  @spec new(kafka_message, keyword) :: t
  def new(record, attributes) do
    attributes =
      Ottla.Options.keyword!(
        attributes,
        [:topic, :partition, generation_id: nil],
        "Ottla.Message.new/2 attributes"
      )

    unless Record.is_record(record, :kafka_message) and tuple_size(record) == 7 do
      raise ArgumentError,
            "invalid record #{inspect(record)}: expected a brod kafka_message record " <>
              "{:kafka_message, offset, key, value, ts_type, ts, headers}"
    end

    kafka_message(offset: offset, key: key, value: value, ts: ts, headers: headers) = record

    unless is_integer(offset),
      do: raise(ArgumentError, "invalid record: offset #{inspect(offset)} is not an integer")

    unless is_integer(attributes[:partition]) and attributes[:partition] >= 0,
      do:
        raise(
          ArgumentError,
          "invalid :partition #{inspect(attributes[:partition])}: expected a non-negative integer"
        )

    %__MODULE__{
      topic: Ottla.Options.topic!(attributes[:topic]),
      partition: attributes[:partition],
      offset: offset,
      key: undefined_to_nil(key),
      value: undefined_to_nil(value),
      timestamp: if(is_integer(ts), do: ts),
      headers: if(is_list(headers), do: headers, else: []),
      generation_id: attributes[:generation_id]
    }
  end

  @doc """
  The brod `kafka_message` record of a message, for code written against brod's records.

  A `nil` key or value becomes `""`, as brod reads them; the timestamp type is `:undefined`
  (a `%Ottla.Message{}` does not carry it).

  ## Example

      iex> %Ottla.Message{offset: 3, key: nil, value: "v", timestamp: 5}
      ...> |> Ottla.Message.to_kafka_message()
      {:kafka_message, 3, "", "v", :undefined, 5, []}
  """
  @spec to_kafka_message(t) :: kafka_message
  def to_kafka_message(%__MODULE__{} = message) do
    kafka_message(
      offset: message.offset,
      key: message.key || "",
      value: message.value || "",
      ts: message.timestamp || :undefined,
      headers: message.headers
    )
  end

  def to_kafka_message(other),
    do: raise(ArgumentError, "invalid message #{inspect(other)}: expected an %Ottla.Message{}")

  @doc """
  `message` with its key, value and headers copied into binaries of their own. The messages
  of one delivery or fetch share one binary: a message kept long after the others are gone
  keeps all of it alive unless copied.
  """
  @spec copy(t) :: t
  def copy(%__MODULE__{} = message) do
    %{
      message
      | key: copy_binary(message.key),
        value: copy_binary(message.value),
        headers:
          for({name, value} <- message.headers, do: {copy_binary(name), copy_binary(value)})
    }
  end

  defp copy_binary(nil), do: nil
  defp copy_binary(binary), do: :binary.copy(binary)

  defp undefined_to_nil(:undefined), do: nil
  defp undefined_to_nil(value), do: value
end
