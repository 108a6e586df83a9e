defmodule Ottla.Group.Acknowledger do
  @moduledoc """
  Acks for a connection's consumer, with the API of Elsa's `Elsa.Group.Acknowledger`.

  An ack goes straight to the NIF (no process in between), so any process may ack at any
  rate. Acks are cumulative: acking offset `n` of a partition means every offset up to `n`
  is done; an ack at or below the current one changes nothing. Acked offsets are committed
  to Kafka in the background (every `:commit_interval` ms), and synchronously when a
  partition is revoked and when the consumer stops.

  An ack carries the generation the message was delivered in (`message.generation_id`). An
  ack from another generation, or for a partition this member does not hold (any more), is
  dropped with a warning and counted in `Ottla.stats/1`: it is never committed. So is an ack
  of an offset that was not delivered yet (it would commit unprocessed messages).

  **Generations.** librdkafka does not expose Kafka's group generation id, so Ottla numbers
  assignments itself: every assignment this member receives gets the next number, and the
  partitions it brings carry it. With the cooperative-sticky strategy a partition kept across
  a rebalance keeps its number, so acks in flight stay valid; with eager strategies every
  rebalance reassigns everything under a new number. Outside a group (`consumer:`) the
  generation is `nil`.

  ## Example

      # in a handler that returned {:continue, state}, later, from any process:
      Ottla.Group.Acknowledger.ack(:my_connection, message)
  """

  require Logger

  alias Ottla.{Group.Manager, Native, Options}

  @doc """
  Acks `offset` (and every offset before it) of `topic`/`partition`, delivered in
  `generation_id`. Always returns `:ok`, like Elsa's; dropped acks are logged (and counted in
  `Ottla.stats/1` while the consumer runs). Wrong argument types raise `ArgumentError`.
  """
  @spec ack(atom, String.t(), non_neg_integer, integer | nil, non_neg_integer) :: :ok
  def ack(connection, topic, partition, generation_id, offset) do
    # Generations are 32-bit (see the moduledoc); no other number can match one.
    unless is_nil(generation_id) or
             (is_integer(generation_id) and generation_id in -2_147_483_648..2_147_483_647),
           do:
             raise(
               ArgumentError,
               "invalid generation_id #{inspect(generation_id)}: expected a 32-bit integer or nil"
             )

    topic = Options.topic!(topic)
    partition = Options.integer!(partition, :partition, 0)
    offset = Options.integer!(offset, :offset, 0, 9_223_372_036_854_775_807)

    case resource(connection) do
      nil ->
        # Like Elsa's cast: an ack for a consumer that is not running (restarting, stopped)
        # is dropped, never raised in the acking process.
        Logger.warning(
          "dropped ack of #{topic}/#{partition} offset #{offset}: connection " <>
            "#{inspect(connection)} has no running consumer"
        )

        :ok

      resource ->
        ack_resource(resource, connection, topic, partition, generation_id, offset)
    end
  end

  defp ack_resource(resource, connection, topic, partition, generation_id, offset) do
    if Manager.exactly_once?(connection) do
      # The worker acks each batch with its transaction; an ack from elsewhere would count
      # the batch done without committing it.
      Logger.warning(
        "dropped ack of #{topic}/#{partition} offset #{offset}: connection " <>
          "#{inspect(connection)}'s consumer is exactly-once, and acks a batch only with its " <>
          "transaction"
      )

      :ok
    else
      ack_native(resource, connection, topic, partition, generation_id, offset)
    end
  end

  defp ack_native(resource, connection, topic, partition, generation_id, offset) do
    result = Native.consumer_ack(resource, topic, partition, generation_id, offset)

    # Checked first, so that an ack builds no metadata when nobody listens.
    if Ottla.Telemetry.enabled?() do
      Ottla.Telemetry.execute([:ottla, :consumer, :ack], %{offset: offset}, %{
        connection: connection,
        topic: topic,
        partition: partition,
        generation_id: generation_id,
        result: result
      })
    end

    :ok
  end

  @doc """
  Acks a message (or any map with `:topic`, `:partition`, `:generation_id` and `:offset`).
  """
  @spec ack(atom, %{
          topic: String.t(),
          partition: non_neg_integer,
          generation_id: integer | nil,
          offset: non_neg_integer
        }) ::
          :ok
  def ack(connection, %{
        topic: topic,
        partition: partition,
        generation_id: generation_id,
        offset: offset
      }),
      do: ack(connection, topic, partition, generation_id, offset)

  def ack(_connection, other),
    do:
      raise(
        ArgumentError,
        "invalid message #{inspect(other, limit: 5)}: expected a map with :topic, :partition, :generation_id and :offset"
      )

  @doc """
  Kept for Elsa compatibility. In Elsa the group manager pushed the new generation to the
  acknowledger; in Ottla the NIF records each partition's generation at assignment itself,
  so this does nothing and returns `:ok`.
  """
  @spec update_generation_id(atom, integer) :: :ok
  def update_generation_id(connection, generation_id) when is_integer(generation_id) do
    Options.connection!(connection)
    :ok
  end

  def update_generation_id(_connection, other),
    do: raise(ArgumentError, "invalid generation_id #{inspect(other)}: expected an integer")

  @doc """
  The offset after the last acked one of `topic`/`partition` (Elsa's "acked + 1"), or `nil`
  when nothing was acked since this member was assigned the partition (or does not hold it,
  or the connection has no running consumer).
  """
  @spec get_latest_offset(atom, String.t(), non_neg_integer) :: non_neg_integer | nil
  def get_latest_offset(connection, topic, partition) do
    topic = Options.topic!(topic)
    partition = Options.integer!(partition, :partition, 0)

    case resource(connection) do
      nil -> nil
      resource -> Native.consumer_latest_offset(resource, topic, partition)
    end
  end

  defp resource(connection), do: Manager.resource(Options.connection!(connection))
end
