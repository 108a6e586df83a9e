defmodule Ottla do
  @moduledoc """
  A Kafka client for Elixir with a Rust core (librdkafka), and the API of Elsa.

  Every function that talks to Kafka takes either **endpoints** (`[localhost: 9092]`,
  `[{"10.0.0.1", 9092}]` or `"host:port,host:port"`), or the name of a connection started
  with `Ottla.Supervisor`, in which case it uses that connection's clients and settings.

  Admin, fetch and metadata calls reuse clients rather than connect each time: a connection
  creates an admin client, fetch consumers (one per concurrent fetch, up to 4 kept idle) and
  a consumer per group asked about with `committed_offsets/4` when a call first needs them,
  and closes them when it stops. Calls given endpoints share such clients per endpoints
  list, closed once no call has used them for 30 seconds. Partition counts are remembered
  for 30 seconds (forgotten at once when a topic is created, grown or deleted through Ottla,
  and asked again for a partition beyond the remembered count); `list_topics/2` always asks
  the cluster. Creating, growing and deleting a topic use an admin client of their own each
  time (a long-lived client that looked at a topic while it was being created can go on
  seeing it without partitions for a while). A produce with endpoints uses a short-lived
  producer (see `produce/4`).

  ## Example

      endpoints = [localhost: 9092]
      :ok = Ottla.create_topic(endpoints, "greetings", partitions: 3)
      :ok = Ottla.produce(endpoints, "greetings", [{"alice", "hello"}, {"bob", "hi"}])
      {:ok, 2, messages} = Ottla.fetch(endpoints, "greetings", partition: 0)

  Errors from Kafka come back as `{:error, %Ottla.Error{}}`; arguments of the wrong shape
  raise `ArgumentError` naming the argument.
  """

  alias Ottla.{Connection, Native, Options, Reply}

  @typedoc "Bootstrap brokers, or the name of a running `Ottla.Supervisor` connection."
  @type target :: atom | Ottla.Options.endpoints()

  @typedoc """
  A message to produce: a binary value, `{key, value}`, or a map with `:value` and optional
  `:key`, `:headers` (`[{name, value}]`) and `:timestamp` (ms since the epoch). Keys and
  values may be iodata; in a list of messages, a list is one message's iodata value (as in
  Elsa, a single iodata message is given as `[iodata]`).
  """
  @type message ::
          binary
          | {iodata | nil, iodata | nil}
          | %{
              required(:value) => iodata | nil,
              optional(:key) => iodata | nil,
              optional(:headers) => [{binary, binary | nil}],
              optional(:timestamp) => non_neg_integer | nil
            }

  @default_timeout 10_000

  @doc """
  Produces one message or a list of messages to `topic`, and returns once Kafka has
  acknowledged every one of them (`acks=all` by default).

  Returns `:ok`, or `{:error, %Ottla.Error{}, failed}` where `failed` is
  `[{message, %Ottla.Error{}}]`: each message that was not delivered, with why. That shape
  holds for every failure, also when the whole call failed (unknown topic, unreachable
  cluster, a connection without a producer): then every message is named. An error's
  `possibly_persisted?` is `true` when its message may have been written all the same;
  retrying only the others cannot write a message twice:

      {:error, _, failed} = Ottla.produce(target, topic, messages)
      retry = for {message, %{possibly_persisted?: false}} <- failed, do: message

  ## Options

    * `:partition` - send every message to this partition. Defaults to choosing by key.
    * `:partitioner` - how to choose a partition when `:partition` is not given:
      `:default` (the Java client's murmur2 on the key, so a key always lands on the same
      partition as it would from a Java producer; keyless messages are spread), `:random`,
      `:md5` (Elsa's md5 partitioner), a module implementing `Ottla.Partitioner`, or a
      function `(partition_count, key) -> partition`. Defaults to `:default`.
    * `:timeout` - milliseconds the call may take; it returns by then. With endpoints it also
      bounds delivery (librdkafka's `message.timeout.ms` is set a little below it). With a
      connection, the producer's own `message.timeout.ms` (30 s unless configured) bounds
      delivery: a message still queued when `:timeout` passes is reported as
      `:timed_out` with `possibly_persisted?: true`, since it may yet be delivered. Nothing
      arrives in the caller's mailbox after the call returns. Defaults to `30000`.
    * `:config` - extra librdkafka producer properties for the short-lived client (ignored
      with a connection, whose producer is configured once). Defaults to `[]`.
    * `:connection` - with endpoints: the name of a connection to produce through when it
      runs and has a producer (as Elsa did); otherwise a short-lived producer is used.

  A connection name that does not run gives `{:error, %Ottla.Error{code: :no_connection},
  failed}` (an error value, as Elsa returned), a connection without a producer
  `code: :no_producer`.

  ## Example

      :ok = Ottla.produce([localhost: 9092], "events", %{key: "k", value: "v", headers: [{"h", "1"}]})
  """
  @spec produce(target, String.t(), message | [message], keyword) ::
          :ok | {:error, Ottla.Error.t(), [{message, Ottla.Error.t()}]}
  def produce(target, topic, messages, opts \\ []),
    do: Ottla.Producer.produce(target, topic, messages, opts)

  @doc """
  Runs `fun` in a Kafka transaction on `connection`'s transactional producer (one started with
  `producer: [transactional_id: "…"]`).

  Every `produce/4` to `connection` from the calling process while `fun` runs joins the
  transaction. When `fun` returns, the transaction commits and the call returns
  `{:ok, fun_result}`: all its messages become visible to `read_committed` readers (Ottla's
  consumers and fetches) together. When `fun` raises, throws or exits, the transaction is
  aborted and the exception goes on: none of its messages is ever visible. When the commit
  fails (a message could not be delivered, say), the transaction is aborted and the call
  returns `{:error, %Ottla.Error{}}`; a produce call inside `fun` that failed has made the
  transaction one that can only abort.

  One transaction is open on a producer at a time: concurrent callers wait their turn. A
  caller that dies has its transaction aborted. Outside `transaction/3`, a `produce/4` call to
  a transactional connection is a transaction of its own.

  A producer fenced by a newer one with the same transactional id (another instance started
  with it) answers `{:error, %Ottla.Error{code: :fenced}}` from then on and is not restarted:
  the newer one has taken over. Transactions do not nest.

  ## Options

    * `:timeout` - milliseconds to wait for the transaction to begin (its turn, and the
      producer's start on a cluster that is away), and again for the commit. When a commit
      does not finish in time the call returns `code: :timed_out` with
      `possibly_persisted?: true`: the producer goes on committing it before any other
      transaction begins. Defaults to `30000`.

  ## Example

      {:ok, :done} =
        Ottla.transaction(:conn, fn ->
          :ok = Ottla.produce(:conn, "orders", {"id-1", "created"})
          :ok = Ottla.produce(:conn, "audit", {"id-1", "order created"})
          :done
        end)
  """
  @spec transaction(atom, (() -> result), keyword) :: {:ok, result} | {:error, Ottla.Error.t()}
        when result: term
  def transaction(connection, fun, opts \\ []), do: Ottla.Transaction.run(connection, fun, opts)

  @doc """
  Creates a topic and waits until the leader of every partition serves it, so a produce or
  fetch right after it finds the topic.

  ## Options

    * `:partitions` - number of partitions, from 1 to 100,000. Defaults to `1`.
    * `:replicas` - replication factor, from 1 to 32,767. Defaults to `1`.
    * `:config` - topic configs, e.g. `["retention.ms": 60_000]`. Defaults to `[]`.
    * `:timeout` - milliseconds. Defaults to `10000`.
  """
  @spec create_topic(target, String.t(), keyword) :: :ok | {:error, Ottla.Error.t()}
  def create_topic(target, topic, opts \\ []) do
    opts =
      Options.keyword!(
        opts,
        [partitions: 1, replicas: 1, config: [], timeout: @default_timeout],
        "Ottla.create_topic/3 options"
      )

    topic = Options.topic!(topic)
    # Bounded: librdkafka aborts the VM on absurd sizes (the mock cluster allocates them all),
    # and the protocol's replication factor is a 16-bit integer.
    partitions = Options.integer!(opts[:partitions], :partitions, 1, 100_000)
    replicas = Options.integer!(opts[:replicas], :replicas, 1, 32_767)
    topic_config = Options.config!(opts[:config])
    timeout = Options.timeout!(opts[:timeout], :timeout)
    {bootstrap, _, _} = Connection.resolve!(target)

    case Ottla.Testing.lookup(bootstrap) do
      nil ->
        clients = Connection.clients!(target)

        Reply.await(
          &Native.admin_create_topic(
            &1,
            &2,
            clients,
            topic,
            partitions,
            replicas,
            topic_config,
            timeout
          ),
          timeout
        )

      mock ->
        GenServer.call(mock, {:create_topic, topic, partitions, replicas}, timeout)
    end
  end

  @doc """
  Grows `topic` to `partitions` partitions in total (Kafka cannot shrink a topic), and waits
  until the leader of every partition serves it. Producers and group consumers pick the new
  partitions up on their next metadata refresh (librdkafka's `topic.metadata.refresh.interval.ms`,
  5 minutes by default; a consumer group rebalances when its leader sees them).

  Returns `:ok`, or `{:error, %Ottla.Error{}}` (e.g. `code: :invalid_partitions` when the
  topic has that many partitions already).

  ## Options

    * `:timeout` - milliseconds. Defaults to `10000`.

  ## Example

      :ok = Ottla.create_partitions([localhost: 9092], "greetings", 6)
  """
  @spec create_partitions(target, String.t(), pos_integer, keyword) ::
          :ok | {:error, Ottla.Error.t()}
  def create_partitions(target, topic, partitions, opts \\ []) do
    opts =
      Options.keyword!(opts, [timeout: @default_timeout], "Ottla.create_partitions/4 options")

    topic = Options.topic!(topic)
    partitions = Options.integer!(partitions, :partitions, 1, 100_000)
    timeout = Options.timeout!(opts[:timeout], :timeout)
    {bootstrap, _, _} = Connection.resolve!(target)

    case Ottla.Testing.lookup(bootstrap) do
      nil ->
        clients = Connection.clients!(target)

        Reply.await(
          &Native.admin_create_partitions(&1, &2, clients, topic, partitions, timeout),
          timeout
        )

      _mock ->
        {:error, Ottla.Error.new(:unsupported, "Ottla.Testing's mock cluster cannot grow topics")}
    end
  end

  @doc """
  Deletes a topic and waits until the cluster's metadata no longer lists it.

  ## Options

    * `:timeout` - milliseconds. Defaults to `10000`.
  """
  @spec delete_topic(target, String.t(), keyword) :: :ok | {:error, Ottla.Error.t()}
  def delete_topic(target, topic, opts \\ []) do
    opts = Options.keyword!(opts, [timeout: @default_timeout], "Ottla.delete_topic/3 options")
    topic = Options.topic!(topic)
    timeout = Options.timeout!(opts[:timeout], :timeout)
    {bootstrap, _, _} = Connection.resolve!(target)

    case Ottla.Testing.lookup(bootstrap) do
      nil ->
        clients = Connection.clients!(target)
        Reply.await(&Native.admin_delete_topic(&1, &2, clients, topic, timeout), timeout)

      _mock ->
        {:error, Ottla.Error.new(:unsupported, "librdkafka's mock cluster cannot delete topics")}
    end
  end

  @doc """
  Lists the cluster's topics (internal `__*` topics left out) with their partition counts,
  sorted by name.

  ## Options

    * `:timeout` - milliseconds. Defaults to `10000`.
  """
  @spec list_topics(target, keyword) ::
          {:ok, [{String.t(), pos_integer}]} | {:error, Ottla.Error.t()}
  def list_topics(target, opts \\ []) do
    opts = Options.keyword!(opts, [timeout: @default_timeout], "Ottla.list_topics/2 options")
    timeout = Options.timeout!(opts[:timeout], :timeout)
    clients = Connection.clients!(target)
    Reply.await(&Native.admin_list_topics(&1, &2, clients, timeout), timeout)
  end

  @doc """
  Whether `topic` exists. Raises `Ottla.Error` when the cluster cannot be asked (a
  `false` would be a guess).
  """
  @spec topic?(target, String.t()) :: boolean
  def topic?(target, topic) do
    topic = Options.topic!(topic)

    case list_topics(target) do
      {:ok, topics} -> List.keymember?(topics, topic, 0)
      {:error, error} -> raise error
    end
  end

  @doc """
  Reads messages of one partition, from `:offset` up to the high watermark (at most
  `:max_messages`), without joining a consumer group or committing anything.

  Returns `{:ok, high_watermark, [%Ottla.Message{}]}`, as Elsa's `fetch/3` does: the high
  watermark is the offset the next produced message will get.

  ## Options

    * `:partition` - defaults to `0`.
    * `:offset` - the first offset to read, `:earliest` or `:latest`. Offsets older than the
      log start read from the log start. Defaults to `0`.
    * `:max_messages` - defaults to `10000`.
    * `:timeout` - milliseconds. Defaults to `10000`.
  """
  @spec fetch(target, String.t(), keyword) ::
          {:ok, non_neg_integer, [Ottla.Message.t()]} | {:error, Ottla.Error.t()}
  def fetch(target, topic, opts \\ []) do
    opts =
      Options.keyword!(
        opts,
        [partition: 0, offset: 0, max_messages: 10_000, timeout: @default_timeout],
        "Ottla.fetch/3 options"
      )

    topic = Options.topic!(topic)
    partition = Options.integer!(opts[:partition], :partition, 0)
    max = Options.integer!(opts[:max_messages], :max_messages, 1)
    timeout = Options.timeout!(opts[:timeout], :timeout)

    offset =
      case opts[:offset] do
        logical when logical in [:earliest, :latest] -> logical
        offset -> Options.integer!(offset, :offset, 0, 9_223_372_036_854_775_807)
      end
      |> Options.position()

    clients = Connection.clients!(target)

    Reply.await(
      &Native.fetch_messages(&1, &2, clients, topic, partition, offset, max, timeout),
      timeout
    )
  end

  @doc """
  What consumer group `group` has committed for each partition of `topic`:
  `{:ok, [{partition, offset | nil}]}`, where `offset` is the next offset the group will read
  (Kafka's convention) and `nil` means nothing was committed.

  ## Options

    * `:timeout` - milliseconds. Defaults to `10000`.
  """
  @spec committed_offsets(target, String.t(), String.t(), keyword) ::
          {:ok, [{non_neg_integer, non_neg_integer | nil}]} | {:error, Ottla.Error.t()}
  def committed_offsets(target, group, topic, opts \\ []) do
    opts =
      Options.keyword!(opts, [timeout: @default_timeout], "Ottla.committed_offsets/4 options")

    timeout = Options.timeout!(opts[:timeout], :timeout)

    group = Options.name!(group, :group)
    topic = Options.topic!(topic)
    clients = Connection.clients!(target)

    Reply.await(
      &Native.admin_committed_offsets(&1, &2, clients, group, topic, timeout),
      timeout
    )
  end

  @doc """
  The state of a connection's consumer: per assigned partition its generation, backlog
  length, whether it is paused, the last delivered, acked and committed offsets, the high
  watermark and the lag; and the time of the last rebalance (ms since the epoch), plus how
  many acks were dropped: `stale_acks` (another generation), `unheld_acks` (a partition not
  held) and `undelivered_acks` (an offset beyond what was delivered); and, for an
  exactly-once consumer, how many of its batches' transactions committed
  (`transactions_committed`) and aborted (`transactions_aborted`, also those refused
  because the partition had moved on or the batch was committed already).

  ## Example

      {:ok, %{partitions: [%{topic: "orders", partition: 0, backlog: 12, paused?: false} | _]}} =
        Ottla.stats(:shop)
  """
  @spec stats(atom) :: {:ok, map} | {:error, Ottla.Error.t()}
  def stats(connection) do
    case Ottla.Group.Manager.resource(Options.connection!(connection)) do
      nil ->
        {:error,
         Ottla.Error.new(
           :no_consumer,
           "connection #{inspect(connection)} has no running consumer"
         )}

      resource ->
        Native.consumer_stats(resource)
    end
  end
end
