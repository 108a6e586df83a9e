defmodule Ottla.Consumer.MessageHandler do
  @moduledoc """
  The behaviour of a consumer's handler, as in Elsa's `Elsa.Consumer.MessageHandler`.

  Each assigned partition gets its own process running the handler: batches of one partition
  arrive in offset order, one at a time; partitions run concurrently.

  ## Example

      defmodule MyApp.OrderHandler do
        use Ottla.Consumer.MessageHandler

        def init(args), do: {:ok, args}

        def handle_messages(messages, state) do
          Enum.each(messages, &MyApp.Orders.store(&1.key, &1.value))
          {:ack, state}
        end
      end

  ## Return values of `handle_messages`

    * `{:ack, state}` / `{:acknowledge, state}` / `:ack` - the whole batch is done: its last
      offset is acked (and later committed).
    * `{:ack, offset, state}` / `{:acknowledge, offset, state}` / `{:ack, offset}` - offsets up
      to `offset` are done; messages of the batch after it are delivered again.
    * `{:no_ack, state}` / `{:noop, state}` / `:no_ack` / `:noop` - nothing is acked; delivery
      goes on. A later ack covers these offsets too (acks are cumulative); if none comes, they
      are delivered again after a restart or a rebalance.
    * `{:continue, state}` / `:continue` - nothing is acked now; the app acks later with
      `Ottla.Group.Acknowledger.ack/5` (from any process). Delivery goes on.
    * `{:seek, offset, state}` - go on from `offset` of this partition (forwards or
      backwards); messages fetched before it are dropped, never delivered. Nothing is acked.
    * `{:error, reason, state}` - the batch failed; see "Failures".
    * `{:produce, [{topic, message}], state}` - an exactly-once consumer's
      (`exactly_once: true`) output: the messages (any shape `Ottla.produce/4` takes) and
      the ack of the whole batch commit together in one Kafka transaction.

  ## Failures

  A handler that raises, exits, throws or returns `{:error, reason, state}` fails its batch.
  The batch (from its first unacked message) is delivered again after a backoff that starts at
  the consumer's `:retry_backoff` and doubles up to `:max_retry_backoff`, with jitter; only
  that partition waits. Retries go one message at a time until the failing message is found,
  so its neighbours are handled normally. After an `{:error, …}` the handler keeps its state;
  after a raise, exit or throw, `init/1` runs again. A message that failed `:max_attempts`
  times (the batch it first failed in counts as one) is handled as `:on_failure` says:
  `:retry` (keep retrying), `:skip` (log it and ack it) or `{:dead_letter, topic}` (produce it
  to `topic` with its key, value and headers plus `ottla.*` headers naming the error, source
  and attempts, and ack it once that produce is confirmed).

  A handler whose effects are per message sees the messages before the failing one again:
  when a batch fails, each of its messages up to the failing one is retried alone, so a
  handler that applied their effects before it failed applies them once more. To avoid that,
  return `{:ack, offset, state}` with the last message it handled (the rest of the batch comes
  again, from the failing one) instead of failing the whole batch.

  Inside a handler, `topic/0`, `partition/0`, `generation_id/0` and `connection/0` tell where
  the batch comes from, and `attempt/0` which attempt this is (1 for a first delivery).
  """

  @type state :: term
  @type messages :: [Ottla.Message.t()]
  @type result ::
          {:ack, state}
          | {:acknowledge, state}
          | {:ack, integer, state}
          | {:acknowledge, integer, state}
          | {:no_ack, state}
          | {:noop, state}
          | {:continue, state}
          | :ack
          | {:ack, integer}
          | :no_ack
          | :noop
          | :continue
          | {:seek, non_neg_integer, state}
          | {:error, term, state}

  @doc "Called when the partition's process starts; returns the handler state."
  @callback init(args :: term) :: {:ok, state}
  @doc "Handles one batch of the partition, with state."
  @callback handle_messages(messages, state) :: result
  @doc "Handles one batch of the partition; the stateless form."
  @callback handle_messages(messages) :: result
  @optional_callbacks handle_messages: 1, handle_messages: 2

  @doc """
  Inside `handle_messages`: which attempt at the current batch this is, 1 for its first
  delivery (see "Failures").
  """
  @spec attempt() :: pos_integer
  def attempt, do: Process.get(:ottla_attempt, 1)

  defmacro __using__(_opts) do
    quote do
      @behaviour Ottla.Consumer.MessageHandler

      @impl Ottla.Consumer.MessageHandler
      def init(args), do: {:ok, args}

      @impl Ottla.Consumer.MessageHandler
      def handle_messages(messages, state) do
        case handle_messages(messages) do
          result when is_atom(result) ->
            {result, state}

          {tag, offset} when tag in [:ack, :acknowledge] and is_integer(offset) ->
            {tag, offset, state}

          other ->
            other
        end
      end

      @impl Ottla.Consumer.MessageHandler
      def handle_messages(_messages), do: :ack

      @doc "The topic of the partition this process handles."
      def topic, do: Process.get(:ottla_topic)
      @doc "The partition this process handles."
      def partition, do: Process.get(:ottla_partition)
      @doc "The generation the partition was assigned in (`nil` outside a group)."
      def generation_id, do: Process.get(:ottla_generation_id)
      @doc "The connection's name."
      def connection, do: Process.get(:ottla_connection)
      @doc "Which attempt at this batch this is: 1 for a first delivery."
      def attempt, do: Ottla.Consumer.MessageHandler.attempt()

      defoverridable init: 1, handle_messages: 1, handle_messages: 2
    end
  end
end
