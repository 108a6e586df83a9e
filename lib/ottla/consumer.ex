defmodule Ottla.Consumer do
  @moduledoc """
  The consumer without a group (`Ottla.Supervisor`'s `consumer:` option), with Elsa's
  `Elsa.Consumer.ack/4`.

  Outside a group nothing is committed: acks are local bookkeeping (what
  `Ottla.Group.Acknowledger.get_latest_offset/3` reads for a group consumer) and tell the
  consumer which messages a restarted worker need not get again.

  ## Example

      # in a handler that returned {:continue, state}, later:
      :ok = Ottla.Consumer.ack(:my_connection, "events", 0, message.offset)
  """

  alias Ottla.{Group.Manager, Native, Options}

  @doc """
  Acks `offset` (and every offset before it) of `topic`/`partition` for the connection's
  consumer without a group. Always returns `:ok`, like Elsa's; an ack for a partition the
  consumer does not read, or beyond what it delivered, is dropped and counted in
  `Ottla.stats/1`.
  """
  @spec ack(atom, String.t(), non_neg_integer, non_neg_integer) :: :ok
  def ack(connection, topic, partition, offset) do
    topic = Options.topic!(topic)
    partition = Options.integer!(partition, :partition, 0)
    offset = Options.integer!(offset, :offset, 0, 9_223_372_036_854_775_807)

    case Manager.resource(Options.connection!(connection), :consumer) do
      nil ->
        :ok

      resource ->
        Native.consumer_ack(resource, topic, partition, nil, offset)
        :ok
    end
  end
end
