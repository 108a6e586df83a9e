defmodule Ottla.Supervisor do
  @moduledoc """
  Starts a named Ottla connection: the native clients for one Kafka cluster (a producer, a
  group consumer or a consumer without a group). The shape of its options follows Elsa's `Elsa.Supervisor`.

  ## Example

      children = [
        {Ottla.Supervisor,
         connection: :orders,
         endpoints: [localhost: 9092],
         config: ["client.id": "orders-service"],
         producer: [topic: "orders"]}
      ]

      Supervisor.start_link(children, strategy: :one_for_one)

      :ok = Ottla.produce(:orders, "orders", [{"key", "value"}])

  ## Options

    * `:connection` - the connection's name, an atom; pass it where the API takes endpoints.
      Required.
    * `:endpoints` - the bootstrap brokers: `[{host, port}]`, `[localhost: 9092]` or
      `"host:port,host:port"`. Required.
    * `:config` - librdkafka properties for every client of the connection, e.g.
      `["security.protocol": "ssl"]`. Keys are atoms or strings, values strings, numbers,
      booleans or atoms. Defaults to `[]`.
    * `:producer` - start a producer so `Ottla.produce/4` can be called with the connection
      name. Elsa's form `[topic: "t", config: [...]]` (or a list of them) is accepted; the
      `:config` entries of all of them go to the connection's one librdkafka producer.
      Ottla sets `acks=all`, the Java client's key partitioner (`murmur2_random`),
      `linger.ms=0` (a call's messages are its batch: the call waits for their verdicts, so
      lingering for more would only delay it) and `message.timeout.ms=30000` unless
      overridden. Without it,
      `Ottla.produce/4` on the connection returns `{:error, %Ottla.Error{code: :no_producer}, _}`.
      With `transactional_id: "…"` the producer is transactional: `Ottla.transaction/3` runs
      transactions on it, and it fences (stops) any older producer with the same id as it
      starts. Give each producer its own id, stable across restarts of the same producer.
    * `:group_consumer` - consume `:topics` as a member of consumer group `:group`; see
      "Group consumer options" below.
    * `:consumer` - consume without a group (Elsa's `consumer:`): fixed partitions, no
      commits; see "Consumer options" below. A connection may have both.
    * `:name` - as in Elsa, a name to register the supervisor under.

  `config:` lists (the connection's, a producer's, a consumer's) take librdkafka properties
  and Elsa's brod option names (`client_id`, `ssl`, `sasl`, `required_acks`, `compression`,
  `begin_offset`, `prefetch_count`, `session_timeout_seconds`, …), translated; see the
  migration guide for the full table. The child spec's id is `Ottla.Supervisor`, as Elsa's
  was: give connections that run side by side their own ids with `Supervisor.child_spec/2`.
  `whereis_worker/3` finds the process handling a partition (Elsa's registry lookup).

  ## Group consumer options

    * `:group` - the consumer group id. Required.
    * `:topics` - the topics to subscribe to. Required.
    * `:handler` - a module using `Ottla.Consumer.MessageHandler`. Required.
    * `:handler_init_args` - passed to the handler's `init/1`. Defaults to `[]`.
    * `:assignment_received_handler` - `fn group, topic, partition, generation_id -> :ok end`,
      called once per assignment of a partition to this member, in the partition's first
      worker process, before anything else of that worker runs: before the `:offsets`
      function, before the partition is taken over and before the handler's `init/1`. A
      restarted worker, or a retried `:offsets` function, does not call it again. Returning
      anything else (or raising) stops the consumer, as in Elsa; its supervisor restarts it.
      Defaults to a function returning `:ok`.
    * `:assignments_revoked_handler` - `fn -> :ok end`, called once per revocation, after the
      revoked partitions' workers have stopped (finished their batch, or were killed at
      `:drain_timeout`) and before those partitions' acks are committed and the rebalance
      proceeds. It runs in a process of its own, killed if it is still running 100 ms past
      the drain deadline. Defaults to a function returning `:ok`.
    * `:begin_offset` - where to start a partition the group never committed: `:earliest` or
      `:latest`. A committed offset always wins. Defaults to `:latest`.
    * `:max_batch` - most messages per `handle_messages` call. Defaults to `500`.
    * `:max_buffered_bytes` - the consumer's memory budget, in bytes, for every partition it
      holds together: an eighth of it is librdkafka's prefetch (`queued.max.messages.kbytes`,
      and as many `queued.min.messages` at 1 KiB each), another eighth the partitions'
      backlogs (shared equally among the assigned partitions; a partition whose share is full
      is paused until its handler catches up) and as much again what they keep of their
      delivered, unacked messages. See guides/consuming.md for the whole memory bound. At least
      8 MiB. Defaults to `134217728` (128 MiB): 8 partitions at full speed, 1,000 partitions
      within about 160 MiB.
    * `:max_backlog` - most messages buffered (in Rust) per partition, besides the byte share:
      a partition whose backlog is full is paused until its handler takes a batch. Defaults
      to `10000` (see guides/benchmarks.md for how the defaults were chosen).
    * `:assignment_strategy` - `:cooperative_sticky`, `:range` or `:roundrobin`.
      Defaults to `:cooperative_sticky`.
    * `:session_timeout` - ms the group waits for a silent member before it gives the member's
      partitions to others (librdkafka's `session.timeout.ms`; the heartbeat interval is a
      tenth of it). Trade-off: a member that dies without leaving (`kill -9`, a lost host or
      network) stalls its partitions for this long, and with `:instance_id` so does any member
      that stops and does not come back; a shorter one moves partitions sooner but lets a
      network hiccup of that length cost a rebalance. The broker bounds it
      (`group.min.session.timeout.ms`, 6 s by default). Defaults to `10000` (librdkafka's
      own default is 45 s).
    * `:instance_id` - static membership (KIP-345, librdkafka's `group.instance.id`): a name
      for this member that is unique in the group and stable across its restarts (a pod or
      host name plus the connection, say). A member that comes back under the same name
      (after a restart, or after a broker outage made it lose its session) takes its
      partitions back at once, without a rebalance and without waiting for its old session
      to expire: after a broker outage the consumer resumes within seconds of the broker
      answering again, where a dynamic member waits for its old membership to time out. The
      price: a static member does not leave the group when it stops, so its partitions wait
      up to `:session_timeout` for it to come back (or for the group to give them away). Two
      members must never share a name: the broker fences the older one, which logs an error,
      stops its workers, releases its partitions and consumes nothing more until its
      connection is restarted. Defaults to `nil` (dynamic membership).
    * `:drain_timeout` - ms a revoked partition's in-flight batch gets to be acked before its
      acks are committed and its worker stopped; also bounds the wait for the revoked handler.
      Defaults to `5000`.
    * `:commit_interval` - ms between background commits of acked offsets. Defaults to `1000`.
    * `:isolation_level` - `:read_committed` (handlers get only messages of committed
      transactions, and messages produced without one; those of aborted transactions and
      transaction markers never reach them) or `:read_uncommitted` (every message as soon
      as it is written). Defaults to `:read_committed`.
    * `:shutdown_timeout` - ms a graceful stop gives what was delivered to be acked, from any
      process (a worker finishing its batch, or a task a handler returned `{:continue, state}`
      after); then the workers stop (busy ones are killed), the acks are committed and the
      group is left. Defaults to `10000` (Elsa's budget).
    * `:retry_backoff` - ms before a failed batch is delivered again; doubles with each
      attempt. Defaults to `500`.
    * `:max_retry_backoff` - the backoff's bound in ms. Defaults to `30000`.
    * `:max_attempts` - attempts a message gets (the batch it first failed in counts as one)
      before `:on_failure` applies: a positive integer or `:infinity`. Defaults to `:infinity`.
    * `:on_failure` - what happens to a message after its last attempt failed: `:retry` (keep
      retrying), `:skip` (log it and ack it) or `{:dead_letter, topic}` (produce it to `topic`
      with `ottla.*` headers naming the error, source topic, partition, offset, attempts and
      time, and ack it once the produce is confirmed; if that produce fails, keep retrying).
      Defaults to `:retry`. See `Ottla.Consumer.MessageHandler`.
    * `:offsets` - where committed offsets live: `:kafka`, `{:elsewhere, fun}` or
      `{:kafka_and_elsewhere, fun}`, where `fun` (or `{module, function, extra_args}`) is
      called with `(topic, partition)` each time a partition's worker starts, and returns
      the next offset to read, or `nil` for `:begin_offset`. The partition goes on from there
      only once librdkafka has confirmed the seek: nothing fetched before it is delivered. A
      function that raises is tried again with the retry backoff. With `:elsewhere` nothing
      is committed to Kafka. Defaults to `:kafka`.
    * `:exactly_once` - `true` makes the consumer exactly-once: a handler may return
      `{:produce, [{topic, message}], state}`, and each batch's output and the ack of the
      batch commit in one Kafka transaction of the connection's producer, with the batch's
      offset sent to the transaction with the group's metadata (KIP-447); `{:ack, state}`
      commits the offset alone the same way. Batches ready at the same time share one
      transaction. A batch whose transaction fails (or shares one that fails) is delivered
      again (the failure policy applies). `{:continue, state}` and `{:ack, offset, state}`
      are refused (the batch's worker raises), as are `offsets:` other than `:kafka` and
      `on_failure: {:dead_letter, topic}`. The connection's producer is made transactional
      with `:transactional_id` unless it has a transactional id already. Defaults to
      `false`. See `guides/exactly-once.md`.
    * `:transactional_id` - with `exactly_once: true`: the producer's transactional id,
      the same across restarts of this member and different from every other member's.
      Defaults to `"ottla-<node>-<connection>-<group>"`.
    * `:config` - librdkafka consumer properties (e.g. `"session.timeout.ms": 10_000`).
      Defaults to `[]`.
    * `:direct_ack` - accepted for Elsa compatibility; acks are always direct.

  ## Consumer options

    * `:topic` - required. `:partition` - a partition or `:all` (default).
    * `:begin_offset` - `:earliest`, `:latest` or an offset. Defaults to `:latest`.
    * `:handler`, `:handler_init_args`, `:max_batch`, `:max_backlog`, `:retry_backoff`,
      `:max_retry_backoff`, `:max_attempts`, `:on_failure`, `:isolation_level`, `:config` -
      as above.
  """
  use Supervisor

  @doc "Returns a child spec for a connection; see the module doc for options."
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(opts) do
    # Elsa's id: `stop_supervised(Ottla.Supervisor)` finds it as it found Elsa.Supervisor;
    # give each connection its own id (Supervisor.child_spec/2) to run several side by side.
    %{
      id: __MODULE__,
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc "Starts the connection's supervisor; see the module doc for options."
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    opts =
      Ottla.Options.keyword!(
        opts,
        [:connection, :endpoints, :producer, :group_consumer, :consumer, :name, config: []],
        "Ottla.Supervisor options"
      )

    name = Ottla.Options.connection!(opts[:connection], ":connection")

    unless Keyword.has_key?(opts, :endpoints), do: raise(ArgumentError, "missing :endpoints")

    conn_opts = [
      connection: name,
      bootstrap: Ottla.Options.bootstrap!(opts[:endpoints]),
      config: Ottla.Options.kafka_config!(opts[:config]),
      producer: producer_config!(opts[:producer])
    ]

    consumers =
      [
        opts[:group_consumer] && Ottla.Consumer.Options.group!(opts[:group_consumer], conn_opts),
        opts[:consumer] && Ottla.Consumer.Options.assign!(opts[:consumer], conn_opts)
      ]
      |> Enum.reject(&is_nil/1)

    conn_opts = exactly_once_producer(conn_opts, consumers, opts[:group_consumer])

    # Elsa's :name registers the supervisor under that name; the connection name is
    # registered in Ottla's registry either way, so two connections cannot share one.
    registration =
      case opts[:name] do
        nil -> [name: via(name)]
        supervisor_name -> [name: supervisor_name!(supervisor_name)]
      end

    # Under the user's :name, the connection name is claimed in init: a name already taken
    # is refused here, without starting anything.
    case opts[:name] && Registry.lookup(Ottla.Registry, {__MODULE__, name}) do
      [{pid, _}] ->
        {:error, {:already_started, pid}}

      _ ->
        Supervisor.start_link(
          __MODULE__,
          {conn_opts, consumers, opts[:name] != nil},
          registration
        )
    end
  end

  @doc """
  Adds a producer to a running connection, as Elsa's `start_producer/2` did. Ottla's one
  producer per connection serves every topic, so when the connection has a producer already
  this only checks the options. `args` is a producer entry (`[topic: t, config: [...]]`);
  its `:config` applies when the producer is created here.

  Returns `:ok` or `{:error, %Ottla.Error{}}`.
  """
  @spec start_producer(atom, keyword) :: :ok | {:error, Ottla.Error.t()}
  def start_producer(connection, args) do
    connection = Ottla.Options.connection!(connection)
    config = producer_config!(args)

    case Ottla.Connection.lookup(connection) do
      nil ->
        {:error,
         Ottla.Error.new(
           :no_connection,
           "no Ottla connection named #{inspect(connection)} is running"
         )}

      conn ->
        Ottla.Connection.start_producer(conn, config)
    end
  end

  @doc """
  The process running the handler for `topic`'s `partition` on a connection, or `nil` when
  none runs for it now (not assigned, or between a worker's exit and its restart). Elsa apps
  found it with `Elsa.Registry.whereis_name({Elsa.Supervisor.registry(connection),
  :"worker_\#{topic}_\#{partition}"})`. The group consumer's worker is looked at first, then the
  one of the consumer without a group.

  A worker that exits is restarted (its unacked messages come again), so a pid found here
  may be gone by the time it is used.

  ## Example

      pid = Ottla.Supervisor.whereis_worker(:shop, "orders", 0)
  """
  @spec whereis_worker(atom, String.t(), non_neg_integer) :: pid | nil
  def whereis_worker(connection, topic, partition) do
    connection = Ottla.Options.connection!(connection)
    topic = Ottla.Options.topic!(topic)
    partition = Ottla.Options.integer!(partition, :partition, 0)

    Enum.find_value([:group, :assign], fn mode ->
      case Registry.lookup(Ottla.Registry, {:workers, connection, mode}) do
        [{workers, _}] -> find_worker(workers, topic, partition)
        [] -> nil
      end
    end)
  end

  # A worker keeps its topic and partition in its process dictionary, where the handler's
  # topic/0 and partition/0 read them.
  defp find_worker(workers, topic, partition) do
    workers
    |> DynamicSupervisor.which_children()
    |> Enum.find_value(fn {_, pid, _, _} ->
      with true <- is_pid(pid),
           {:dictionary, dictionary} <- Process.info(pid, :dictionary),
           ^topic <- :proplists.get_value(:ottla_topic, dictionary),
           ^partition <- :proplists.get_value(:ottla_partition, dictionary) do
        pid
      else
        _ -> nil
      end
    end)
  catch
    # The connection stopped meanwhile.
    :exit, _ -> nil
  end

  @doc false
  def via(name), do: {:via, Registry, {Ottla.Registry, {__MODULE__, name}}}

  @impl true
  def init({conn_opts, consumers, named?}) do
    if named? do
      # Registered under the user's name: claim the connection name in the registry too.
      case Registry.register(Ottla.Registry, {__MODULE__, conn_opts[:connection]}, nil) do
        {:ok, _} -> :ok
        # Started meanwhile by another process: the start fails as a via name's would.
        {:error, {:already_registered, pid}} -> exit({:already_started, pid})
      end
    end

    # Shutdown budgets: the connection flushes its producer for up to 10 s; the manager
    # commits, leaves the group and joins librdkafka's threads.
    connection = %{
      id: Ottla.Connection,
      start: {Ottla.Connection, :start_link, [conn_opts]},
      shutdown: 15_000
    }

    # rest_for_one: the workers' supervisor starts before the manager, so the manager stops
    # first and stops the workers itself (each finishing its batch within the drain timeout)
    # before it commits and leaves the group. If the workers' supervisor fails, the manager
    # restarts with it; a restarted manager stops the workers of its predecessor.
    consumer_children =
      Enum.flat_map(consumers, fn opts ->
        workers = {:via, Registry, {Ottla.Registry, {:workers, opts.connection, opts.mode}}}

        [
          Supervisor.child_spec({DynamicSupervisor, name: workers, strategy: :one_for_one},
            id: {:workers, opts.mode}
          ),
          %{
            id: {Ottla.Group.Manager, opts.mode},
            start: {Ottla.Group.Manager, :start_link, [Map.put(opts, :worker_sup, workers)]},
            shutdown: opts.shutdown_timeout + 15_000
          }
        ]
      end)

    Supervisor.init([connection | consumer_children], strategy: :rest_for_one)
  end

  # What OTP accepts as a name, checked before a process is started with it (a :via module
  # that cannot register would crash the start).
  defp supervisor_name!(name) when is_atom(name) and name not in [true, false], do: name
  defp supervisor_name!({:global, _} = name), do: name

  defp supervisor_name!({:via, module, _} = name) when is_atom(module) do
    if Code.ensure_loaded?(module) and function_exported?(module, :register_name, 2),
      do: name,
      else: supervisor_name!({:bad_via, name})
  end

  defp supervisor_name!(other) do
    raise ArgumentError,
          "invalid :name #{inspect(other)}: expected an atom, {:global, term} or " <>
            "{:via, module, term}"
  end

  # An exactly-once group consumer's output and offsets commit in transactions of the
  # connection's producer: it is made transactional (with the consumer's transactional id)
  # unless it is already.
  defp exactly_once_producer(conn_opts, consumers, group_consumer) do
    if Enum.any?(consumers, &(&1.mode == :group and &1.exactly_once)) do
      id = Ottla.Consumer.Options.transactional_id(conn_opts[:connection], group_consumer)
      producer = conn_opts[:producer] || []

      if List.keymember?(producer, "transactional.id", 0),
        do: conn_opts,
        else: Keyword.put(conn_opts, :producer, [{"transactional.id", id} | producer])
    else
      conn_opts
    end
  end

  defp producer_config!(nil), do: nil

  defp producer_config!(producer) when is_list(producer) do
    entries = if Keyword.keyword?(producer), do: [producer], else: producer

    Enum.flat_map(entries, fn entry ->
      # :poll (pick up new partitions) is what librdkafka does on its own.
      entry =
        Ottla.Options.keyword!(entry, [:topic, :poll, :transactional_id, config: []], ":producer")

      if entry[:topic], do: Ottla.Options.topic!(entry[:topic])
      config = Ottla.Options.kafka_config!(entry[:config], :producer)

      case entry[:transactional_id] do
        nil ->
          config

        id when is_binary(id) and id != "" ->
          unless Ottla.Options.text?(id),
            do: raise(ArgumentError, "invalid :transactional_id #{inspect(id)}: not UTF-8 text")

          [{"transactional.id", id} | List.keydelete(config, "transactional.id", 0)]

        other ->
          raise ArgumentError,
                "invalid :transactional_id #{inspect(other)}: expected a non-empty string"
      end
    end)
  end

  defp producer_config!(other),
    do: raise(ArgumentError, "invalid :producer #{inspect(other)}: expected a keyword list")
end
