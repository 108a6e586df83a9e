defmodule Ottla.Testing do
  @moduledoc """
  An embedded Kafka for trying Ottla and for your own tests: librdkafka's in-process mock
  cluster, started through the NIF. No broker, JVM or network needed.

  The mock cluster speaks the Kafka protocol on loopback ports, so every Ottla function works
  against it. It keeps a few MiB per partition and is meant for tests, not for data.

  ## Example

      {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
      :ok = Ottla.create_topic(endpoints, "t", partitions: 2)
      :ok = Ottla.produce(endpoints, "t", {"k", "v"})

  In ExUnit, `start_supervised!({Ottla.Testing, brokers: 1})` returns the owning pid;
  `Ottla.Testing.endpoints(pid)` gives its endpoints.

  ## Faults

  The embedded cluster can misbehave on request, so that a test can show what an app does
  when Kafka does: `broker_down/2` and `broker_up/2`, `set_latency/3`, `fail_requests/4`,
  `move_leader/4` and `move_coordinator/3`. Brokers are numbered from 1. Each returns `:ok`,
  or raises `ArgumentError` for a bad argument (endpoints that are not a running mock
  cluster, a broker out of range, an unknown API or error name).

      {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
      :ok = Ottla.create_topic(endpoints, "t")
      :ok = Ottla.Testing.broker_down(endpoints, 1)
      {:error, _, _} = Ottla.produce(endpoints, "t", "lost in the outage", timeout: 1_000)
      :ok = Ottla.Testing.broker_up(endpoints, 1)
      :ok = Ottla.produce(endpoints, "t", "after the outage")
  """
  use GenServer

  @doc false
  def child_spec(opts),
    do: %{id: {__MODULE__, make_ref()}, start: {__MODULE__, :start_link, [opts]}}

  @doc """
  Starts a mock cluster owned by a process linked to the caller and returns its endpoints.
  It stops when that process stops (`stop_mock_cluster/1`), or when the caller exits,
  for whatever reason.

  ## Options

    * `:brokers` - number of brokers, from 1 to 32. Defaults to `1`.
  """
  @spec start_mock_cluster(keyword) ::
          {:ok, [{String.t(), :inet.port_number()}]} | {:error, Ottla.Error.t()}
  def start_mock_cluster(opts \\ []) do
    with {:ok, pid} <- start_link(opts), do: {:ok, endpoints(pid)}
  end

  @doc "Stops the mock cluster behind `endpoints` (as returned by `start_mock_cluster/1`)."
  @spec stop_mock_cluster([{String.t(), :inet.port_number()}]) :: :ok
  def stop_mock_cluster(endpoints) do
    case lookup(Ottla.Options.bootstrap!(endpoints)) do
      nil -> :ok
      pid -> GenServer.stop(pid)
    end
  end

  @doc "Starts a mock cluster owned by the new process; see `start_mock_cluster/1`."
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts) do
    opts = Ottla.Options.keyword!(opts, [brokers: 1], "Ottla.Testing options")
    # Each mock broker holds sockets and a thread: librdkafka aborts the VM when it cannot
    # have them, so the count is bounded.
    brokers = Ottla.Options.integer!(opts[:brokers], :brokers, 1, 32)
    GenServer.start_link(__MODULE__, {brokers, self()})
  end

  @doc """
  The endpoints of the mock cluster owned by `pid`. Raises `ArgumentError` when `pid` is not
  a running mock cluster.
  """
  @spec endpoints(pid) :: [{String.t(), :inet.port_number()}]
  def endpoints(pid) when is_pid(pid) do
    GenServer.call(pid, :endpoints)
  catch
    :exit, _ -> raise ArgumentError, "#{inspect(pid)} is not a running mock cluster"
  end

  def endpoints(other),
    do: raise(ArgumentError, "invalid pid #{inspect(other)}: expected a mock cluster's pid")

  @impl true
  def init({brokers, owner}) do
    # Linked to its owner, but a link does not stop it when the owner ends normally: the
    # monitor does, so a cluster never outlives the process that started it.
    Process.monitor(owner)

    case Ottla.Native.mock_cluster_start(brokers) do
      {:ok, cluster, bootstrap} ->
        {:ok, _} = Registry.register(Ottla.Registry, {__MODULE__, bootstrap}, nil)

        endpoints =
          for e <- String.split(bootstrap, ","),
              [h, p] = String.split(e, ":"),
              do: {h, String.to_integer(p)}

        {:ok, %{cluster: cluster, bootstrap: bootstrap, endpoints: endpoints, groups: %{}}}

      {:error, error} ->
        {:stop, error}
    end
  end

  @doc false
  # The mock cluster behind a bootstrap string, if it is one of ours: the mock has no
  # CreateTopics handler, so Ottla.create_topic/3 creates topics through it.
  @spec lookup(String.t()) :: pid | nil
  def lookup(bootstrap) do
    case Registry.lookup(Ottla.Registry, {__MODULE__, bootstrap}) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  @doc false
  # Claims `strategy` for consumer group `group` on the mock cluster behind `bootstrap` (if it
  # is one): `:ok`, or `{:error, strategy}` when the group already uses another one. The mock
  # aborts the VM when one group's members ask for different strategies, so a group keeps
  # its first one for the cluster's life.
  @spec claim_group(String.t(), String.t(), atom) :: :ok | {:error, atom}
  def claim_group(bootstrap, group, strategy) do
    case lookup(bootstrap) do
      nil -> :ok
      pid -> GenServer.call(pid, {:claim_group, group, strategy})
    end
  catch
    # The cluster stopped meanwhile: nothing to claim.
    :exit, _ -> :ok
  end

  # Kafka's API keys, by name.
  @apis %{
    produce: 0,
    fetch: 1,
    list_offsets: 2,
    metadata: 3,
    offset_commit: 8,
    offset_fetch: 9,
    find_coordinator: 10,
    join_group: 11,
    heartbeat: 12,
    leave_group: 13,
    sync_group: 14,
    describe_groups: 15,
    list_groups: 16,
    api_versions: 18,
    create_topics: 19,
    delete_topics: 20,
    init_producer_id: 22,
    add_partitions_to_txn: 24,
    add_offsets_to_txn: 25,
    end_txn: 26,
    txn_offset_commit: 28,
    describe_configs: 32,
    consumer_group_heartbeat: 68
  }

  @doc """
  Takes broker `broker` of the mock cluster behind `endpoints` down: it drops its connections
  and refuses new ones until `broker_up/2`. Its partitions keep it as their leader, so
  producing to them fails (within the call's `:timeout`) and consuming them stalls.
  """
  @spec broker_down(Ottla.Options.endpoints(), pos_integer) :: :ok
  def broker_down(endpoints, broker) do
    broker = broker!(broker)
    fault(endpoints, :broker_down, &Ottla.Native.mock_cluster_broker_set(&1, broker, true))
  end

  @doc "Brings broker `broker` back after `broker_down/2`: clients reconnect by themselves."
  @spec broker_up(Ottla.Options.endpoints(), pos_integer) :: :ok
  def broker_up(endpoints, broker) do
    broker = broker!(broker)
    fault(endpoints, :broker_up, &Ottla.Native.mock_cluster_broker_set(&1, broker, false))
  end

  @doc """
  Delays every answer of broker `broker` by `ms` milliseconds (0 for none), as a slow
  network or a busy broker would.
  """
  @spec set_latency(Ottla.Options.endpoints(), pos_integer, non_neg_integer) :: :ok
  def set_latency(endpoints, broker, ms) do
    ms = Ottla.Options.integer!(ms, :ms, 0, 3_600_000)

    broker = broker!(broker)

    fault(
      endpoints,
      :set_latency,
      &Ottla.Native.mock_cluster_set_latency(&1, broker, ms)
    )
  end

  @doc """
  Makes the next `count` requests of Kafka API `api` (to any broker) fail with Kafka error
  `error`, e.g. `fail_requests(endpoints, :produce, :not_enough_replicas, 3)`.

  `api` is one of #{@apis |> Map.keys() |> Enum.sort() |> Enum.map_join(", ", &"`#{inspect(&1)}`")}.
  `error` is a Kafka (broker) error by its `Ottla.Error` code, e.g. `:not_leader_for_partition`,
  `:request_timed_out`, `:coordinator_not_available`, `:topic_authorization_failed`. What a
  client does with it is Kafka's rule: it retries a retriable error (the app sees a delay), and
  gives up on another (the app sees the error).

  ## Example

      :ok = Ottla.Testing.fail_requests(endpoints, :produce, :topic_authorization_failed, 1)
      {:error, %Ottla.Error{code: :topic_authorization_failed}, _} = Ottla.produce(endpoints, "t", "x")
      :ok = Ottla.produce(endpoints, "t", "x")
  """
  @spec fail_requests(Ottla.Options.endpoints(), atom, atom, pos_integer) :: :ok
  def fail_requests(endpoints, api, error, count \\ 1) do
    key =
      Map.get(@apis, api) ||
        raise ArgumentError,
              "invalid api #{inspect(api)}: expected one of #{inspect(Enum.sort(Map.keys(@apis)))}"

    unless is_atom(error) and not is_nil(error) and is_binary(Atom.to_string(error)),
      do: raise(ArgumentError, "invalid error #{inspect(error)}: expected a Kafka error's code")

    count = Ottla.Options.integer!(count, :count, 1, 10_000)

    fault(
      endpoints,
      :fail_requests,
      &Ottla.Native.mock_cluster_fail_requests(&1, key, Atom.to_string(error), count)
    )
  end

  @doc """
  Makes broker `broker` the leader of `topic`'s `partition`: clients find the new leader on
  their next metadata refresh, as after a leader election.
  """
  @spec move_leader(Ottla.Options.endpoints(), String.t(), non_neg_integer, pos_integer) :: :ok
  def move_leader(endpoints, topic, partition, broker) do
    topic = Ottla.Options.topic!(topic)
    partition = Ottla.Options.integer!(partition, :partition, 0, 100_000)

    broker = broker!(broker)

    fault(
      endpoints,
      :move_leader,
      &Ottla.Native.mock_cluster_set_leader(&1, topic, partition, broker)
    )
  end

  @doc """
  Makes broker `broker` the coordinator of consumer group `group` (or, with
  `{:transaction, transactional_id}`, of a transactional producer): its members find the new
  one when the old one answers `not_coordinator` or goes away.
  """
  @spec move_coordinator(
          Ottla.Options.endpoints(),
          String.t() | {:transaction, String.t()},
          pos_integer
        ) ::
          :ok
  def move_coordinator(endpoints, group, broker) do
    {kind, key} =
      case group do
        {:transaction, id} when is_binary(id) -> {"transaction", id}
        group when is_binary(group) -> {"group", group}
        other -> raise ArgumentError, "invalid group #{inspect(other)}: expected a group name"
      end

    unless Ottla.Options.text?(key),
      do: raise(ArgumentError, "invalid group #{inspect(group)}: not UTF-8 text without NUL")

    broker = broker!(broker)

    fault(
      endpoints,
      :move_coordinator,
      &Ottla.Native.mock_cluster_set_coordinator(&1, kind, key, broker)
    )
  end

  # How often the wait helpers look again.
  @poll_interval 25

  @doc """
  Waits until the consumer of connection `connection` holds its partitions, and returns the
  `{topic, partition}`s it holds, sorted. Raises `Ottla.Testing.TimeoutError` naming what
  it waited for and what the consumer held when `:timeout` passes.

  A consumer starting at `begin_offset: :latest` (the default) finds the end of a
  partition only after it holds it: a message produced right after this returns may come
  before that start. Tests that produce right away read fresh topics from `:earliest`.

  ## Options

    * `:partitions` - what to wait for: `:all`, every partition of the topics the consumer
      reads (a group's only member, or a consumer without a group); a number, at least that
      many partitions; or a list of `{topic, partition}`. Defaults to `:all`.
    * `:timeout` - milliseconds. Defaults to `10000`.

  ## Example

      start_supervised!({Ottla.Supervisor, connection: :app, endpoints: endpoints,
        group_consumer: [group: "g", topics: ["t"], handler: MyHandler, begin_offset: :earliest]})

      [{"t", 0}, {"t", 1}] = Ottla.Testing.await_assignment(:app)
  """
  @spec await_assignment(atom, keyword) :: [{String.t(), non_neg_integer}]
  def await_assignment(connection, opts \\ []) do
    opts =
      Ottla.Options.keyword!(
        opts,
        [partitions: :all, timeout: 10_000],
        "Ottla.Testing.await_assignment/2 options"
      )

    connection = Ottla.Options.connection!(connection)
    timeout = Ottla.Options.timeout!(opts[:timeout], :timeout)
    want = wanted_partitions!(opts[:partitions])

    await(timeout, "#{inspect(connection)} to hold #{describe_wanted(want)}", fn ->
      with {:ok, stats} <- consumer_stats(connection),
           {:ok, expected} <- expected_partitions(connection, want) do
        held = for row <- stats.partitions, do: {row.topic, row.partition}

        done =
          case expected do
            {:at_least, n} -> length(held) >= n
            list -> Enum.all?(list, &(&1 in held))
          end

        if done, do: {:ok, held}, else: {:wait, "it holds #{inspect(held)}"}
      end
    end)
  end

  @doc """
  Waits until the consumer of connection `connection` has acked `offsets`, and returns
  `:ok`. Raises `Ottla.Testing.TimeoutError` with what it saw (per partition: the last
  acked offset, the committed offset, the lag) when `:timeout` passes.

  `offsets` is a list of `{topic, partition, offset}`, each acked when that offset or a later
  one is; or a topic (or a list of topics), meaning everything produced to it so far: its
  partitions' ends are read when the call starts, and each partition must be held by this
  consumer. Records no handler sees (transaction markers, aborted messages) count as done.

  ## Example

      :ok = Ottla.produce(endpoints, "t", [{"k", "v1"}, {"k", "v2"}])
      :ok = Ottla.Testing.await_acked(:app, "t")
  """
  @spec await_acked(
          atom,
          String.t() | [String.t() | {String.t(), non_neg_integer, integer}],
          keyword
        ) :: :ok
  def await_acked(connection, offsets, opts \\ []),
    do: await_offsets(connection, offsets, opts, :acked)

  @doc """
  Like `await_acked/3`, but waits until Kafka has confirmed the group's commit of `offsets`:
  a committed offset is the next one to read, so `{topic, partition, offset}` is committed
  once the commit is past it. Only a group consumer commits.

  ## Example

      :ok = Ottla.Testing.await_committed(:app, "t")
      {:ok, [{0, 2}]} = Ottla.committed_offsets(endpoints, "g", "t")
  """
  @spec await_committed(
          atom,
          String.t() | [String.t() | {String.t(), non_neg_integer, integer}],
          keyword
        ) :: :ok
  def await_committed(connection, offsets, opts \\ []),
    do: await_offsets(connection, offsets, opts, :committed)

  @doc """
  Waits until `topic` is usable through `target` (endpoints or a connection): the cluster
  lists it, with at least `:partitions` partitions, and each partition's leader answers.
  Returns `:ok`, or raises `Ottla.Testing.TimeoutError` when `:timeout` passes.

  ## Options

    * `:partitions` - the least partition count to wait for. Defaults to `1`.
    * `:timeout` - milliseconds. Defaults to `10000`.

  ## Example

      :ok = Ottla.create_topic(endpoints, "t", partitions: 3)
      :ok = Ottla.Testing.await_topic(endpoints, "t", partitions: 3)
  """
  @spec await_topic(Ottla.target(), String.t(), keyword) :: :ok
  def await_topic(target, topic, opts \\ []) do
    opts =
      Ottla.Options.keyword!(
        opts,
        [partitions: 1, timeout: 10_000],
        "Ottla.Testing.await_topic/3 options"
      )

    topic = Ottla.Options.topic!(topic)
    least = Ottla.Options.integer!(opts[:partitions], :partitions, 1)
    timeout = Ottla.Options.timeout!(opts[:timeout], :timeout)
    what = "topic #{inspect(topic)} with #{least} partition(s)"

    await(timeout, what, fn ->
      with {:ok, topics} <- Ottla.list_topics(target, timeout: min(timeout, 5_000)),
           {:count, count} when count >= least <-
             {:count, List.keyfind(topics, topic, 0, {topic, 0}) |> elem(1)},
           :ok <- leaders_answer(target, topic, count, min(timeout, 5_000)) do
        {:ok, :ok}
      else
        {:count, 0} -> {:wait, "the cluster does not list it"}
        {:count, count} -> {:wait, "it has #{count} partition(s)"}
        {:error, %Ottla.Error{} = e} -> {:wait, "last error: #{Exception.message(e)}"}
      end
    end)
  end

  defp leaders_answer(target, topic, count, timeout) do
    Enum.reduce_while(0..(count - 1), :ok, fn p, :ok ->
      case Ottla.fetch(target, topic,
             partition: p,
             offset: :latest,
             max_messages: 1,
             timeout: timeout
           ) do
        {:ok, _, _} -> {:cont, :ok}
        {:error, e} -> {:halt, {:error, e}}
      end
    end)
  end

  defp await_offsets(connection, offsets, opts, kind) do
    name = if kind == :acked, do: "await_acked/3", else: "await_committed/3"
    opts = Ottla.Options.keyword!(opts, [timeout: 10_000], "Ottla.Testing.#{name} options")
    connection = Ottla.Options.connection!(connection)
    timeout = Ottla.Options.timeout!(opts[:timeout], :timeout)
    deadline = System.monotonic_time(:millisecond) + timeout
    targets = offset_targets!(connection, offsets, deadline)
    what = "#{inspect(connection)} to have #{kind} #{describe_targets(targets)}"

    await(max(deadline - System.monotonic_time(:millisecond), 0), what, fn ->
      with {:ok, stats} <- consumer_stats(connection) do
        rows = Map.new(stats.partitions, &{{&1.topic, &1.partition}, &1})
        pending = Enum.reject(targets, &offset_done?(&1, rows, kind))

        if pending == [],
          do: {:ok, :ok},
          else: {:wait, "pending: " <> Enum.map_join(pending, "; ", &describe_row(&1, rows))}
      end
    end)
  end

  # {tp, {:offset, n}}: offset n done; {tp, {:end, n}}: everything before n done.
  defp offset_done?({tp, target}, rows, kind) do
    case {Map.get(rows, tp), target, kind} do
      {nil, _, _} -> false
      # An empty partition: nothing to ack or commit.
      {_row, {:end, 0}, _} -> true
      {row, {:offset, n}, :acked} -> gte?(row.last_acked, n) or gte?(row.committed, n + 1)
      {row, {:end, n}, :acked} -> gte?(row.committed, n) or caught_up?(row, n)
      {row, {:offset, n}, :committed} -> gte?(row.committed, n + 1)
      {row, {:end, n}, :committed} -> gte?(row.committed, n)
    end
  end

  # Everything before `n` is processed: the consumer has seen an end at or past `n` and has
  # no lag behind it (acked, or past records no handler sees).
  defp caught_up?(row, n), do: gte?(row.high_watermark, n) and row.lag == 0
  defp gte?(value, n), do: is_integer(value) and value >= n

  defp offset_targets!(connection, topic, deadline) when is_binary(topic),
    do: offset_targets!(connection, [topic], deadline)

  defp offset_targets!(connection, offsets, deadline) when is_list(offsets) and offsets != [] do
    Enum.flat_map(offsets, fn
      {topic, partition, offset} when is_integer(partition) and is_integer(offset) ->
        [{{Ottla.Options.topic!(topic), partition}, {:offset, offset}}]

      topic when is_binary(topic) ->
        topic = Ottla.Options.topic!(topic)
        ends!(connection, topic, deadline)

      other ->
        raise ArgumentError,
              "invalid offsets entry #{inspect(other)}: expected a topic or {topic, partition, offset}"
    end)
  end

  defp offset_targets!(_connection, other, _deadline),
    do:
      raise(
        ArgumentError,
        "invalid offsets #{inspect(other)}: expected a topic or a non-empty list of topics " <>
          "and {topic, partition, offset}"
      )

  # Each partition's end (the offset the next produced message gets), read now.
  defp ends!(connection, topic, deadline) do
    timeout = fn -> max(deadline - System.monotonic_time(:millisecond), 1) end

    count =
      case Ottla.list_topics(connection, timeout: timeout.()) do
        {:ok, topics} -> List.keyfind(topics, topic, 0, {topic, 0}) |> elem(1)
        {:error, e} -> raise timeout_error("the partitions of #{inspect(topic)}", e.message)
      end

    if count == 0, do: raise(ArgumentError, "invalid topic #{inspect(topic)}: it does not exist")

    for p <- 0..(count - 1) do
      case Ottla.fetch(connection, topic,
             partition: p,
             offset: :latest,
             max_messages: 1,
             timeout: timeout.()
           ) do
        {:ok, hw, _} -> {{topic, p}, {:end, hw}}
        {:error, e} -> raise timeout_error("the end of #{topic}/#{p}", e.message)
      end
    end
  end

  defp describe_targets(targets) do
    Enum.map_join(targets, ", ", fn
      {{t, p}, {:offset, n}} -> "#{t}/#{p} offset #{n}"
      {{t, p}, {:end, n}} -> "#{t}/#{p} up to #{n}"
    end)
  end

  defp describe_row({{t, p} = tp, _}, rows) do
    case Map.get(rows, tp) do
      nil ->
        "#{t}/#{p} not held"

      row ->
        "#{t}/#{p} last acked #{inspect(row.last_acked)}, committed #{inspect(row.committed)}, " <>
          "high watermark #{inspect(row.high_watermark)}, lag #{inspect(row.lag)}"
    end
  end

  defp wanted_partitions!(:all), do: :all
  defp wanted_partitions!(n) when is_integer(n) and n > 0, do: {:at_least, n}

  defp wanted_partitions!(list) when is_list(list) and list != [] do
    Enum.map(list, fn
      {topic, p} when is_binary(topic) and is_integer(p) and p >= 0 ->
        {topic, p}

      other ->
        raise ArgumentError,
              "invalid partitions entry #{inspect(other)}: expected {topic, partition}"
    end)
  end

  defp wanted_partitions!(other),
    do:
      raise(
        ArgumentError,
        "invalid partitions #{inspect(other)}: expected :all, a positive integer or a list of {topic, partition}"
      )

  defp describe_wanted(:all), do: "every partition of its topics"
  defp describe_wanted({:at_least, n}), do: "at least #{n} partition(s)"
  defp describe_wanted(list), do: inspect(list)

  defp expected_partitions(_connection, {:at_least, _} = want), do: {:ok, want}
  defp expected_partitions(_connection, list) when is_list(list), do: {:ok, list}

  defp expected_partitions(connection, :all) do
    case Ottla.Group.Manager.subscription(connection) do
      nil ->
        {:wait, "it has no running consumer"}

      {:partitions, list} ->
        {:ok, list}

      {:topics, topics} ->
        case Ottla.list_topics(connection) do
          {:ok, listed} ->
            {:ok,
             for(
               t <- topics,
               {^t, count} <- listed,
               p <- 0..(count - 1),
               do: {t, p}
             )}

          {:error, e} ->
            {:wait, "its topics could not be listed: #{e.message}"}
        end
    end
  end

  defp consumer_stats(connection) do
    case Ottla.stats(connection) do
      {:ok, stats} -> {:ok, stats}
      {:error, e} -> {:wait, e.message}
    end
  end

  defp await(timeout, what, check) do
    deadline = System.monotonic_time(:millisecond) + timeout
    await_loop(check, deadline, timeout, what)
  end

  defp await_loop(check, deadline, timeout, what) do
    case check.() do
      {:ok, value} ->
        value

      {:wait, seen} ->
        if System.monotonic_time(:millisecond) >= deadline do
          raise timeout_error("#{what} (#{timeout} ms)", seen)
        else
          Process.sleep(@poll_interval)
          await_loop(check, deadline, timeout, what)
        end
    end
  end

  defp timeout_error(what, seen),
    do: %Ottla.Testing.TimeoutError{message: "timed out waiting for #{what}: #{seen}"}

  defp broker!(broker), do: Ottla.Options.integer!(broker, :broker, 1, 32)

  # Runs `call` with the cluster behind `endpoints` (on its owner process, which holds it).
  defp fault(endpoints, what, call) do
    bootstrap =
      try do
        Ottla.Options.bootstrap!(endpoints)
      rescue
        ArgumentError ->
          raise ArgumentError, "invalid endpoints #{inspect(endpoints)}: not a mock cluster's"
      end

    pid =
      lookup(bootstrap) ||
        raise ArgumentError, "invalid endpoints #{inspect(endpoints)}: no mock cluster runs there"

    result =
      try do
        GenServer.call(pid, {:fault, call})
      catch
        :exit, _ -> raise ArgumentError, "the mock cluster at #{inspect(endpoints)} stopped"
      end

    case result do
      :ok -> :ok
      {:error, %Ottla.Error{} = error} -> raise ArgumentError, "#{what}: #{error.message}"
    end
  end

  @doc false
  # Test-only: the next `count` requests of Kafka API `api_key` (e.g. 9, OffsetFetch) to
  # broker `broker` of the mock cluster behind `endpoints` are answered after `rtt_ms`.
  def delay_requests(endpoints, broker, api_key, count, rtt_ms) do
    bootstrap = Enum.map_join(endpoints, ",", fn {h, p} -> "#{h}:#{p}" end)

    case lookup(bootstrap) do
      nil -> raise ArgumentError, "#{inspect(endpoints)} is not a running mock cluster"
      pid -> GenServer.call(pid, {:delay_requests, broker, api_key, count, rtt_ms})
    end
  end

  @impl true
  def handle_call(:endpoints, _from, state), do: {:reply, state.endpoints, state}

  def handle_call({:fault, call}, _from, state) do
    # Arguments are checked before `call` is made; whatever it raises still must not stop
    # the cluster.
    reply =
      try do
        call.(state.cluster)
      rescue
        e -> {:error, Ottla.Error.new(:invalid_arg, Exception.message(e))}
      end

    {:reply, reply, state}
  end

  def handle_call({:delay_requests, broker, api_key, count, rtt_ms}, _from, state) do
    {:reply,
     Ottla.Native.mock_cluster_delay_requests(state.cluster, broker, api_key, count, rtt_ms),
     state}
  end

  def handle_call({:claim_group, group, strategy}, _from, state) do
    groups = state.groups

    case Map.get(groups, group, strategy) do
      ^strategy -> {:reply, :ok, Map.put(state, :groups, Map.put(groups, group, strategy))}
      other -> {:reply, {:error, other}, state}
    end
  end

  def handle_call({:create_topic, topic, partitions, replicas}, _from, state) do
    {:reply, Ottla.Native.mock_cluster_create_topic(state.cluster, topic, partitions, replicas),
     state}
  end

  @impl true
  def handle_info({:DOWN, _ref, :process, _owner, _reason}, state), do: {:stop, :normal, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Clients cached for calls given this cluster's endpoints would only retry a dead port.
    Ottla.Native.clients_forget(state.bootstrap)
    Ottla.Native.mock_cluster_stop(state.cluster)
  end
end
