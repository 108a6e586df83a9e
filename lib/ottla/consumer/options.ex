defmodule Ottla.Consumer.Options do
  @moduledoc false
  # Validation of `group_consumer:` and `consumer:` (documented in Ottla.Supervisor).

  import Bitwise

  alias Ottla.Options
  require Logger

  @common [
    :handler,
    handler_init_args: [],
    max_batch: 500,
    max_backlog: 10_000,
    max_buffered_bytes: 134_217_728,
    drain_timeout: 5_000,
    shutdown_timeout: 10_000,
    commit_interval: 1_000,
    max_attempts: :infinity,
    on_failure: :retry,
    retry_backoff: 500,
    max_retry_backoff: 30_000,
    isolation_level: :read_committed,
    config: []
  ]

  @strategies %{
    cooperative_sticky: "cooperative-sticky",
    range: "range",
    roundrobin: "roundrobin"
  }

  def group!(raw, conn) do
    opts =
      Options.keyword!(
        raw,
        [
          :group,
          :topics,
          :direct_ack,
          assignment_received_handler: fn _, _, _, _ -> :ok end,
          assignments_revoked_handler: fn -> :ok end,
          begin_offset: :latest,
          assignment_strategy: :cooperative_sticky,
          offsets: :kafka,
          instance_id: nil,
          session_timeout: 10_000,
          exactly_once: false,
          transactional_id: nil
        ] ++ @common,
        ":group_consumer options"
      )
      |> with_brod_config(raw)

    group = Options.name!(opts[:group], :group)
    topics = opts[:topics]

    unless is_list(topics) and topics != [] and Options.proper_list?(topics),
      do:
        raise(
          ArgumentError,
          "invalid :topics #{inspect(topics)}: expected a non-empty list of topic names"
        )

    Enum.each(topics, &Options.topic!/1)

    unless is_function(opts[:assignment_received_handler], 4),
      do:
        raise(
          ArgumentError,
          "invalid :assignment_received_handler: expected a function of 4 arguments"
        )

    unless is_function(opts[:assignments_revoked_handler], 0),
      do:
        raise(
          ArgumentError,
          "invalid :assignments_revoked_handler: expected a function of no arguments"
        )

    begin = opts[:begin_offset]

    unless begin in [:earliest, :latest],
      do:
        raise(
          ArgumentError,
          "invalid :begin_offset #{inspect(begin)}: expected :earliest or :latest (a group " <>
            "consumer starts a partition it never committed at one of them; to start at " <>
            "offsets of your own, use offsets: {:elsewhere, fun})"
        )

    # librdkafka has one setting (auto.offset.reset) for a partition without a committed
    # offset and for an offset out of range; brod had begin_offset and offset_reset_policy.
    reset = opts[:offset_reset]

    if reset && reset != begin do
      Logger.warning(
        "group #{inspect(opts[:group])}: Ottla takes :begin_offset #{inspect(begin)} for " <>
          "offsets out of range too (librdkafka's auto.offset.reset is one setting for " <>
          "both); the brod option offset_reset_policy (#{inspect(reset)}) is not applied"
      )
    end

    strategy =
      Map.get(@strategies, opts[:assignment_strategy]) ||
        raise ArgumentError,
              "invalid :assignment_strategy #{inspect(opts[:assignment_strategy])}: " <>
                "expected :cooperative_sticky, :range or :roundrobin"

    session = Options.integer!(opts[:session_timeout], :session_timeout, 1_000, 3_600_000)
    mock_group!(Keyword.fetch!(conn, :bootstrap), group, opts[:assignment_strategy])

    defaults =
      [
        {"group.id", group},
        {"auto.offset.reset", Atom.to_string(begin)},
        {"partition.assignment.strategy", strategy}
      ] ++ instance_id!(opts[:instance_id])

    # Session and heartbeat are tunables (a user's config overrides them), the rest is not.
    session_tunables = [
      {"session.timeout.ms", Integer.to_string(session)},
      {"heartbeat.interval.ms", Integer.to_string(max(div(session, 10), 100))}
    ]

    common!(opts, conn, defaults, session_tunables)
    |> Map.merge(%{
      mode: :group,
      group: group,
      topics: topics,
      begin_offset: begin,
      assignment_received_handler: opts[:assignment_received_handler],
      assignments_revoked_handler: opts[:assignments_revoked_handler]
    })
    |> Map.merge(offsets!(opts[:offsets]))
    |> exactly_once!(opts)
  end

  # An exactly-once consumer commits each batch's offsets in the transaction of its output
  # (`Ottla.Transaction.commit_batch/4`), never through the consumer's own commits.
  defp exactly_once!(parsed, opts) do
    case opts[:exactly_once] do
      false ->
        if opts[:transactional_id] != nil,
          do: raise(ArgumentError, "invalid :transactional_id: it needs exactly_once: true")

        Map.put(parsed, :exactly_once, false)

      true ->
        unless opts[:offsets] == :kafka,
          do:
            raise(
              ArgumentError,
              "invalid :offsets #{inspect(opts[:offsets])} with exactly_once: true " <>
                "(its offsets commit in Kafka transactions)"
            )

        if match?({:dead_letter, _}, opts[:on_failure]),
          do:
            raise(
              ArgumentError,
              "invalid :on_failure #{inspect(opts[:on_failure])} with exactly_once: true " <>
                "(dead letters do not go through the consumer's transactions): use :retry or :skip"
            )

        case opts[:transactional_id] do
          nil -> :ok
          id -> Options.name!(id, :transactional_id)
        end

        Map.merge(parsed, %{exactly_once: true, commit: false})

      other ->
        raise ArgumentError, "invalid :exactly_once #{inspect(other)}: expected a boolean"
    end
  end

  @doc """
  The transactional id of an exactly-once group consumer's connection: its own, or one
  stable across restarts of the connection on this node (a restart fences its predecessor).
  """
  def transactional_id(connection, group_consumer) do
    group_consumer[:transactional_id] ||
      "ottla-#{node()}-#{connection}-#{group_consumer[:group]}"
  end

  def assign!(raw, conn) do
    opts =
      Options.keyword!(
        raw,
        [:topic, :poll, partition: :all, begin_offset: :latest] ++ @common,
        ":consumer options"
      )
      |> with_brod_config(raw)

    topic = Options.topic!(opts[:topic])
    partition = opts[:partition]
    unless partition == :all, do: Options.integer!(partition, :partition, 0)
    begin = opts[:begin_offset]

    # Offsets are 64-bit: a bigger integer would reach the NIF as a bare badarg.
    unless begin in [:earliest, :latest] or
             (is_integer(begin) and begin in 0..9_223_372_036_854_775_807),
           do:
             raise(
               ArgumentError,
               "invalid :begin_offset #{inspect(begin)}: expected :earliest, :latest or an offset"
             )

    # librdkafka wants a group id even to assign partitions; nothing is ever committed to it.
    group_id = "ottla-#{Keyword.fetch!(conn, :connection)}-#{System.unique_integer([:positive])}"

    # Out-of-range offsets go to the earliest unless brod's offset_reset_policy said latest.
    reset = Atom.to_string(opts[:offset_reset] || :earliest)

    common!(opts, conn, [{"group.id", group_id}, {"auto.offset.reset", reset}])
    |> Map.merge(%{
      mode: :assign,
      group: nil,
      topics: [topic],
      partition: partition,
      begin_offset: begin,
      assignment_received_handler: fn _, _, _, _ -> :ok end,
      assignments_revoked_handler: fn -> :ok end,
      commit: false,
      offsets_fun: nil,
      exactly_once: false
    })
  end

  # Elsa's brod option names in :config: properties are translated; begin_offset,
  # offset_reset_policy and offset_commit_interval_seconds become Ottla's options unless those
  # are given themselves. :offset_reset keeps offset_reset_policy for what only it says (where
  # an out-of-range offset goes).
  defp with_brod_config(opts, raw) do
    {props, extra} = Ottla.BrodConfig.translate(opts[:config], :config)

    begin =
      cond do
        Keyword.has_key?(raw, :begin_offset) -> opts[:begin_offset]
        Keyword.has_key?(extra, :begin_offset) -> extra[:begin_offset]
        Keyword.has_key?(extra, :offset_reset) -> extra[:offset_reset]
        true -> opts[:begin_offset]
      end

    commit =
      if Keyword.has_key?(raw, :commit_interval),
        do: opts[:commit_interval],
        else: Keyword.get(extra, :commit_interval, opts[:commit_interval])

    opts
    |> Keyword.put(:config, props)
    |> Keyword.put(:begin_offset, begin)
    |> Keyword.put(:offset_reset, extra[:offset_reset])
    |> Keyword.put(:commit_interval, commit)
  end

  # Where committed offsets live: Kafka (default), elsewhere (the app's store, read back by
  # the function on each assignment), or both.
  defp offsets!(:kafka), do: %{commit: true, offsets_fun: nil}
  defp offsets!({:elsewhere, fun}), do: %{commit: false, offsets_fun: offsets_fun!(fun)}
  defp offsets!({:kafka_and_elsewhere, fun}), do: %{commit: true, offsets_fun: offsets_fun!(fun)}

  defp offsets!(other) do
    raise ArgumentError,
          "invalid :offsets #{inspect(other)}: expected :kafka, {:elsewhere, fun} or " <>
            "{:kafka_and_elsewhere, fun}, with fun a function (topic, partition) -> " <>
            "next offset | nil, or {module, function, extra_args}"
  end

  defp offsets_fun!(fun) when is_function(fun, 2), do: fun

  defp offsets_fun!({m, f, a} = mfa) when is_atom(m) and is_atom(f) and is_list(a), do: mfa

  defp offsets_fun!(other), do: offsets!({:elsewhere_fun, other})

  # librdkafka's mock cluster aborts the VM (an assertion, rd_kafka_mock_cgrp_classic_elect_leader)
  # when members of one group ask for different assignment strategies, where a broker answers
  # INCONSISTENT_GROUP_PROTOCOL. On a mock cluster a group keeps its first strategy.
  defp mock_group!(bootstrap, group, strategy) do
    case Ottla.Testing.claim_group(bootstrap, group, strategy) do
      :ok ->
        :ok

      {:error, other} ->
        raise ArgumentError,
              "invalid :assignment_strategy #{inspect(strategy)}: group #{inspect(group)} on " <>
                "this mock cluster uses #{inspect(other)} (librdkafka's mock cluster aborts " <>
                "the VM when one group mixes strategies)"
    end
  end

  # librdkafka's mock cluster (Ottla.Testing) rebalances a group that a member left, or that
  # a member joins while others are in it, only after the session timeout less a second; and
  # it answers a fetch with nothing new only after fetch.wait.max.ms, even when a message
  # arrives meanwhile. On the mock, both are short unless the user's config says otherwise:
  # a member stopped and started again holds its partitions after about 1.5 s (librdkafka's
  # defaults would make it 44 s), and a produced message reaches a handler within about 50 ms
  # (bench/embedded.exs).
  defp mock_cluster_tunables(bootstrap) do
    if Ottla.Testing.lookup(bootstrap),
      do: [
        {"session.timeout.ms", "2500"},
        {"heartbeat.interval.ms", "250"},
        {"fetch.wait.max.ms", "50"}
      ],
      else: []
  end

  defp isolation_level!(:read_committed), do: "read_committed"
  defp isolation_level!(:read_uncommitted), do: "read_uncommitted"

  defp isolation_level!(other) do
    raise ArgumentError,
          "invalid :isolation_level #{inspect(other)}: expected :read_committed or :read_uncommitted"
  end

  # Static membership (KIP-345): the member keeps its identity across restarts and broker
  # outages, so the group gives its partitions back without waiting for its old session.
  defp instance_id!(nil), do: []

  defp instance_id!(id) when is_binary(id) and byte_size(id) in 1..249 do
    if String.match?(id, ~r/^[A-Za-z0-9._-]+$/),
      do: [{"group.instance.id", id}],
      else: bad_instance_id!(id)
  end

  defp instance_id!(other), do: bad_instance_id!(other)

  defp bad_instance_id!(other) do
    raise ArgumentError,
          "invalid :instance_id #{inspect(other)}: expected nil or a name of 1 to 249 " <>
            "letters, digits, '.', '_' or '-', unique in the group and stable across restarts"
  end

  defp common!(opts, conn, defaults, session_tunables \\ []) do
    handler = opts[:handler]

    unless is_atom(handler) and not is_nil(handler) and Code.ensure_loaded?(handler) and
             function_exported?(handler, :init, 1) and
             function_exported?(handler, :handle_messages, 2) do
      raise ArgumentError,
            "invalid :handler #{inspect(handler)}: expected a module with " <>
              "`use Ottla.Consumer.MessageHandler`"
    end

    # Tunables a user may override: librdkafka's fetch queue backoff is shortened because its
    # 1 s default stalls a busy consumer. Every partition's messages go to one queue, so
    # librdkafka bounds its prefetch for the whole consumer: an eighth of the byte budget
    # (which also caps a fetch response), or as many messages as that makes at 1 KiB each
    # (librdkafka's own cost per queued message is about 600 bytes).
    max_backlog = Options.integer!(opts[:max_backlog], :max_backlog, 1, 100_000_000)

    budget = Options.integer!(opts[:max_buffered_bytes], :max_buffered_bytes, 8_388_608, 1 <<< 40)

    prefetch_kb = Integer.to_string(div(budget, 8 * 1024))

    tunables =
      [
        {"fetch.queue.backoff.ms", "10"},
        {"queued.min.messages", prefetch_kb},
        {"queued.max.messages.kbytes", prefetch_kb},
        # librdkafka's reconnect backoff grows to 10 s: after a broker outage the consumer
        # would find the broker back up to 10 s late.
        {"reconnect.backoff.max.ms", "1000"},
        {"isolation.level", isolation_level!(opts[:isolation_level])}
      ] ++ session_tunables ++ mock_cluster_tunables(Keyword.fetch!(conn, :bootstrap))

    # What the guarantees rest on comes last (and is refused in user config): Ottla commits
    # acked offsets only.
    ottla = [{"enable.auto.commit", "false"}, {"enable.auto.offset.store", "false"} | defaults]

    %{
      max_attempts: max_attempts!(opts[:max_attempts]),
      on_failure: on_failure!(opts[:on_failure]),
      retry_backoff: Options.timeout!(opts[:retry_backoff], :retry_backoff),
      max_retry_backoff: Options.timeout!(opts[:max_retry_backoff], :max_retry_backoff),
      connection: Keyword.fetch!(conn, :connection),
      bootstrap: Keyword.fetch!(conn, :bootstrap),
      connection_config: Keyword.fetch!(conn, :config),
      props:
        tunables ++
          Keyword.fetch!(conn, :config) ++ Options.client_config!(opts[:config]) ++ ottla,
      handler: handler,
      handler_init_args: opts[:handler_init_args],
      max_batch: Options.integer!(opts[:max_batch], :max_batch, 1, 1_000_000),
      max_backlog: max_backlog,
      max_buffered_bytes: budget,
      drain_timeout: Options.timeout!(opts[:drain_timeout], :drain_timeout, 0),
      shutdown_timeout: Options.timeout!(opts[:shutdown_timeout], :shutdown_timeout, 0),
      commit_interval: Options.timeout!(opts[:commit_interval], :commit_interval)
    }
  end

  @doc """
  The consumer's settings in the one shape the NIF takes (`Tuning` in
  `native/ottla_nif/src/consumer/nif.rs`, which documents each field): durations in ms,
  `nil` for no limit.
  """
  def tuning(opts) do
    %{
      max_batch: opts.max_batch,
      max_backlog: opts.max_backlog,
      max_buffered_bytes: opts.max_buffered_bytes,
      drain_timeout: opts.drain_timeout,
      commit_interval: opts.commit_interval,
      commit: opts.commit,
      max_attempts: if(opts.max_attempts != :infinity, do: opts.max_attempts),
      retry_backoff: opts.retry_backoff,
      max_retry_backoff: opts.max_retry_backoff,
      on_failure:
        case opts.on_failure do
          {:dead_letter, _topic} -> :dead_letter
          policy -> policy
        end,
      start_from_worker: opts.offsets_fun != nil,
      exactly_once: opts.exactly_once
    }
  end

  defp max_attempts!(:infinity), do: :infinity
  defp max_attempts!(n) when is_integer(n) and n >= 1 and n <= 1_000_000, do: n

  defp max_attempts!(other) do
    raise ArgumentError,
          "invalid :max_attempts #{inspect(other)}: expected :infinity or a positive integer"
  end

  defp on_failure!(policy) when policy in [:retry, :skip], do: policy
  defp on_failure!({:dead_letter, topic}), do: {:dead_letter, Options.topic!(topic)}

  defp on_failure!(other) do
    raise ArgumentError,
          "invalid :on_failure #{inspect(other)}: expected :retry, :skip or {:dead_letter, topic}"
  end
end
