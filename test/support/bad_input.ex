defmodule Ottla.BadInput do
  @moduledoc false
  # A generator of bad (and some good) calls to Ottla's public API, for
  # test/ottla/bad_input_test.exs. No hex packages: plain `:rand`, seeded per call with
  # `{seed, index}`, so call `index` of a seed is the same call on every run and calls can run
  # concurrently. A call is `%{mfa: {module, function, args}, expect: kind, budget: ms}`;
  # `Ottla.BadInput.Runner` runs it (in a peer VM) and `classify/2` says whether what it did
  # is documented.

  import Bitwise

  # The calls' context: what the peer started for them (see `Runner.setup/2`).
  @type ctx :: %{
          endpoints: String.t(),
          mock: [{String.t(), pos_integer}],
          topic: String.t(),
          mock_topic: String.t(),
          seed: integer
        }

  ## Generation

  @doc "Call `index` of `seed`."
  def call(seed, index, ctx) do
    # :rand's seeding from small integers is nearly linear ({1, 11} and {3, 5} gave the same
    # stream): hash the pair, so that different seeds give different calls.
    <<a::64, b::64, c::64, _::binary>> =
      :crypto.hash(:sha256, :erlang.term_to_binary({seed, index}))

    :rand.seed(:exsss, {a, b, c})

    {mfa, expect, budget} =
      weighted([
        {14, fn -> produce(ctx) end},
        {6, fn -> producer_produce(ctx) end},
        {4, fn -> transaction(ctx) end},
        {6, fn -> create_topic(ctx) end},
        {3, fn -> delete_topic(ctx) end},
        {6, fn -> list_topics(ctx) end},
        {3, fn -> topic?(ctx) end},
        {8, fn -> fetch(ctx) end},
        {4, fn -> fetch_stream(ctx) end},
        {5, fn -> committed_offsets(ctx) end},
        {4, fn -> stats(ctx) end},
        {3, fn -> ready?(ctx) end},
        {8, fn -> ack5(ctx) end},
        {5, fn -> ack2(ctx) end},
        {3, fn -> update_generation_id(ctx) end},
        {5, fn -> get_latest_offset(ctx) end},
        {6, fn -> supervisor_start(ctx) end},
        {2, fn -> child_spec(ctx) end},
        {3, fn -> start_producer(ctx) end},
        {3, fn -> start_mock_cluster() end},
        {2, fn -> stop_mock_cluster(ctx) end},
        {2, fn -> testing_endpoints() end},
        {6, fn -> testing_fault(ctx) end},
        {5, fn -> testing_await(ctx) end}
      ])

    %{index: index, mfa: mfa, expect: expect, budget: budget}
  end

  defp produce(ctx) do
    {target, network?} = target(ctx)
    args = [target, topic(ctx), messages(), produce_opts(ctx, network?)]
    # Without options the timeout is 30 s: not with a broker that never answers.
    args = if unreachable?(target), do: args, else: maybe_drop_last(args, 3)
    {{Ottla, :produce, args}, :produce, 12_000}
  end

  # Ottla.transaction/3 on the transactional connection, others and bad values, with a
  # function that produces generated messages to the connection (or bad functions).
  defp transaction(ctx) do
    target = pick([:fuzz_txn, :fuzz_txn, :fuzz_txn, :fuzz_conn, :never_started, "x", nil, 42])
    topic = topic(ctx)
    messages = messages()
    produce_opts = produce_opts(ctx, true)

    fun =
      weighted([
        {6, fn -> fn -> Ottla.produce(:fuzz_txn, topic, messages, produce_opts) end end},
        {2, fn -> fn -> :nothing end end},
        {1, fn -> fun(:arity2) end},
        {1, &bad/0}
      ])

    opts = opts(timeout: &timeout/0)
    {{Ottla, :transaction, [target, fun, opts]}, :ok_tuple, 12_000}
  end

  defp producer_produce(ctx) do
    {target, network?} = target(ctx)

    {{Ottla.Producer, :produce, [target, topic(ctx), messages(), produce_opts(ctx, network?)]},
     :produce, 12_000}
  end

  defp create_topic(ctx) do
    {target, _} = target(ctx)

    opts =
      opts(
        partitions: fn ->
          small_or_bad(1..4, [0, -1, 100_001, 1 <<< 31, 1 <<< 64, nil, "2", 1.5])
        end,
        replicas: fn -> small_or_bad(1..2, [0, -1, 32_768, 1 <<< 40, :one]) end,
        config: &topic_config/0,
        timeout: &timeout/0
      )

    args = [target, weighted([{3, fn -> pool_topic(ctx) end}, {2, fn -> topic(ctx) end}]), opts]
    {{Ottla, :create_topic, maybe_drop_last(args, 2)}, :ok_or_error, 12_000}
  end

  defp delete_topic(ctx) do
    {target, _} = target(ctx)
    # Only the fuzzer's own topics (or unknown and bad names) are ever deleted.
    topic = weighted([{3, fn -> pool_topic(ctx) end}, {2, &bad_topic/0}, {1, &unknown_topic/0}])
    {{Ottla, :delete_topic, [target, topic, opts(timeout: &timeout/0)]}, :ok_or_error, 12_000}
  end

  defp list_topics(ctx) do
    {target, _} = target(ctx)
    args = [target, opts(timeout: &timeout/0)]
    {{Ottla, :list_topics, maybe_drop_last(args, 1)}, :ok_tuple, 12_000}
  end

  defp topic?(ctx) do
    # topic?/2 takes no timeout (10 s): no unreachable brokers here.
    target = pick([ctx.endpoints, ctx.mock, :fuzz_conn, :never_started, :fuzz_stopped, bad()])
    {{Ottla, :topic?, [target, topic(ctx)]}, :boolean_or_raise, 14_000}
  end

  defp fetch(ctx) do
    {target, _} = target(ctx)

    opts =
      opts(
        partition: &partition/0,
        offset: fn ->
          pick([:earliest, :latest, 0, 1, 5, -1, -3, 1 <<< 63, (1 <<< 63) - 1, nil, "0", 1.0])
        end,
        max_messages: fn -> small_or_bad(1..50, [0, -1, 1 <<< 40, nil]) end,
        timeout: &timeout/0
      )

    mod = pick([Ottla, Ottla.Fetch])
    {{mod, :fetch, [target, topic(ctx), opts]}, :fetch, 12_000}
  end

  defp fetch_stream(ctx) do
    {target, _} = target(ctx)

    opts =
      opts(
        partition: &partition/0,
        start_offset: fn -> small_or_bad(0..5, [-1, 1 <<< 63, nil, :earliest]) end,
        end_offset: fn -> small_or_bad(0..10, [-1, 1 <<< 63, :latest]) end,
        chunk_size: fn -> small_or_bad(1..20, [0, -1, 1_000_001, nil]) end,
        timeout: &timeout/0
      )

    {fun, args} =
      weighted([
        {3, fn -> {:fetch_stream, [target, topic(ctx), opts]} end},
        {1,
         fn -> {:search, [target, topic(ctx), pick([fun(:keep_all), fun(:arity2), :x]), opts]} end},
        {1, fn -> {:search_keys, [target, topic(ctx), pick(["k", "", nil, 1]), opts]} end},
        {1, fn -> {:search_values, [target, topic(ctx), pick(["v", <<255>>, nil]), opts]} end}
      ])

    {{Ottla.BadInput.Runner, :take_stream, [fun, args]}, :stream, 14_000}
  end

  defp committed_offsets(ctx) do
    {target, _} = target(ctx)

    group = pick(["fuzz-group", "g-#{:rand.uniform(5)}", "", nil, <<255>>, "a\0b", :atom, 1, 'g'])

    args = [target, group, topic(ctx), opts(timeout: &timeout/0)]
    {{Ottla, :committed_offsets, maybe_drop_last(args, 3)}, :ok_tuple, 12_000}
  end

  defp stats(_ctx), do: {{Ottla, :stats, [connection()]}, :ok_tuple, 5_000}
  defp ready?(_ctx), do: {{Ottla.Producer, :ready?, [connection()]}, :boolean, 5_000}

  defp ack5(ctx) do
    args = [connection(), topic(ctx), partition(), generation(), offset()]
    {{Ottla.Group.Acknowledger, :ack, args}, :ack, 5_000}
  end

  defp ack2(ctx) do
    message =
      weighted([
        {3,
         fn ->
           %{
             topic: topic(ctx),
             partition: partition(),
             generation_id: generation(),
             offset: offset()
           }
         end},
        {1,
         fn ->
           %Ottla.Message{topic: topic(ctx), partition: partition(), offset: offset(), value: "v"}
         end},
        {1, fn -> %{topic: topic(ctx), offset: 1} end},
        {1, &bad/0}
      ])

    {{Ottla.Group.Acknowledger, :ack, [connection(), message]}, :ack, 5_000}
  end

  defp update_generation_id(_ctx),
    do:
      {{Ottla.Group.Acknowledger, :update_generation_id, [connection(), generation()]}, :ack,
       5_000}

  defp get_latest_offset(ctx),
    do:
      {{Ottla.Group.Acknowledger, :get_latest_offset, [connection(), topic(ctx), partition()]},
       :latest, 5_000}

  defp child_spec(ctx),
    do: {{Ottla.Supervisor, :child_spec, [supervisor_opts(ctx)]}, :child_spec, 5_000}

  defp start_producer(ctx) do
    args = pick([[topic: topic(ctx)], [topic: topic(ctx), config: client_config()], [], bad()])

    {{Ottla.Supervisor, :start_producer, [connection(), args]}, :ok_or_error, 35_000}
  end

  defp supervisor_start(ctx) do
    {{Ottla.Supervisor, :start_link, [supervisor_opts(ctx)]}, :on_start, 30_000}
  end

  defp start_mock_cluster do
    opts = opts(brokers: fn -> small_or_bad(1..3, [0, -1, 33, 100_000, 1 <<< 40, nil, "1"]) end)

    weighted([
      {2, fn -> {{Ottla.Testing, :start_mock_cluster, [opts]}, :ok_tuple, 10_000} end},
      {1, fn -> {{Ottla.Testing, :start_link, [opts]}, :on_start, 10_000} end}
    ])
  end

  defp stop_mock_cluster(ctx) do
    endpoints = pick([[{"127.0.0.1", 1}], "127.0.0.1:1", ctx.endpoints, bad()])
    {{Ottla.Testing, :stop_mock_cluster, [endpoints]}, :ack, 5_000}
  end

  defp testing_endpoints do
    pid = pick([dead_pid(), nil, :x, 1, fun(:keep_all)])
    {{Ottla.Testing, :endpoints, [pid]}, :endpoints, 5_000}
  end

  # The embedded cluster's faults. The fuzz run shares its mock cluster, so the good calls
  # among these leave it usable: brokers are taken down only when out of range.
  defp testing_fault(ctx) do
    mock = pick([ctx.mock, ctx.mock, ctx.mock, ctx.endpoints, [{"127.0.0.1", 1}], bad()])
    up = fn -> small_or_bad(1..1, [0, -1, 2, 33, 1 <<< 40, nil, "1"]) end
    out_of_range = fn -> pick([0, -1, 2, 33, 1 <<< 40, nil, "1", 1.0]) end

    {function, args} =
      pick([
        {:broker_down, [mock, out_of_range.()]},
        {:broker_up, [mock, up.()]},
        {:set_latency, [mock, up.(), small_or_bad(0..0, [-1, 3_600_001, 1 <<< 40, nil, 1.5])]},
        {:fail_requests,
         [
           mock,
           pick([:produce, :fetch, :offset_commit, :bogus, nil, "produce", 1]),
           pick([:not_leader_for_partition, :request_timed_out, :bogus_error, nil, 1, :""]),
           small_or_bad(1..1, [0, -1, 10_001, nil, "1"])
         ]},
        {:move_leader,
         [
           mock,
           pick([ctx.mock_topic, bad_topic()]),
           small_or_bad(0..1, [-1, 1 <<< 40, nil]),
           up.()
         ]},
        {:move_coordinator,
         [
           mock,
           pick([
             "fuzz-group",
             {:transaction, "fuzz-txn"},
             {:transaction, 1},
             nil,
             <<0>>,
             <<255>>,
             1
           ]),
           up.()
         ]}
      ])

    {{Ottla.Testing, function, args}, :ack, 5_000}
  end

  # The wait helpers, with short timeouts: they return what they waited for or raise
  # Ottla.Testing.TimeoutError.
  defp testing_await(ctx) do
    short = fn -> small_or_bad(0..50, [-1, nil, :infinity, 1.5, 1 <<< 64]) end
    topic = fn -> pick([ctx.mock_topic, ctx.topic, unknown_topic(), bad_topic()]) end

    {function, args} =
      pick([
        {:await_assignment,
         [
           connection(),
           opts(
             partitions: fn ->
               pick([:all, 1, 2, 0, -1, [{ctx.mock_topic, 0}], [{:t, 0}], [], nil, "1"])
             end,
             timeout: short
           )
         ]},
        {:await_acked,
         [
           connection(),
           pick([topic.(), [{ctx.mock_topic, 0, 1}], [{:t, 0, 1}], [], nil, [topic.()]]),
           opts(timeout: short)
         ]},
        {:await_committed,
         [connection(), pick([topic.(), [{ctx.topic, 0, 0}], [], 1]), opts(timeout: short)]},
        {:await_topic,
         [
           pick([ctx.mock, ctx.endpoints, :fuzz_conn, :never_started, bad()]),
           topic.(),
           opts(partitions: fn -> small_or_bad(1..2, [0, -1, nil, 1 <<< 40]) end, timeout: short)
         ]}
      ])

    {{Ottla.Testing, function, args}, :await, 12_000}
  end

  ## Option lists

  defp supervisor_opts(ctx) do
    {endpoints, _} = target(ctx, false)

    base =
      opts(
        connection: fn -> pick([:fuzz_s1, :fuzz_s2, :fuzz_s3, :fuzz_conn, nil, "c", 1, true]) end,
        endpoints: fn -> endpoints end,
        config: &client_config/0,
        producer: fn ->
          pick([[topic: topic(ctx)], [], [[topic: topic(ctx)], [config: client_config()]], bad()])
        end,
        group_consumer: fn -> group_consumer(ctx) end,
        consumer: fn -> consumer(ctx) end,
        name: fn ->
          pick([nil, :fuzz_sup_name, {:global, :fuzz_sup}, {:via, :nope, 1}, "n", 1])
        end
      )

    weighted([{2, fn -> base end}, {3, fn -> valid_start(ctx) end}, {1, &bad/0}])
  end

  # Options that would start a connection, with at most one of them made bad: reaches the
  # starts themselves (clients, consumers joining, failed starts cleaning up) far more often
  # than independent random options.
  defp valid_start(ctx) do
    endpoints = pick([ctx.endpoints, ctx.endpoints, ctx.mock])
    topic = if endpoints == ctx.mock, do: ctx.mock_topic, else: ctx.topic

    session =
      pick([
        ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000],
        ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000],
        ["group.protocol": "consumer"]
      ])

    group =
      mutated(
        [
          group: "fuzz-sg-#{:rand.uniform(3)}",
          topics: [topic],
          handler: Ottla.BadInput.Handler,
          config: session
        ],
        [
          begin_offset: pick([:earliest, :latest]),
          max_batch: Enum.random(1..100),
          assignment_strategy: pick([:cooperative_sticky, :range, :roundrobin]),
          drain_timeout: Enum.random(0..500),
          shutdown_timeout: Enum.random(0..500),
          on_failure: pick([:retry, :skip, {:dead_letter, topic}]),
          offsets: pick([:kafka, {:elsewhere, fun(:offsets)}])
        ],
        fn -> group_consumer(ctx) |> pick_pair() end
      )

    consumer =
      mutated(
        [topic: topic, handler: Ottla.BadInput.Handler],
        [
          partition: pick([:all, 0, 1]),
          begin_offset: pick([:earliest, :latest, 0]),
          config: session
        ],
        fn -> consumer(ctx) |> pick_pair() end
      )

    mutated(
      [connection: pick([:fuzz_s1, :fuzz_s2, :fuzz_s3]), endpoints: endpoints],
      [
        producer: [topic: topic],
        group_consumer: group,
        consumer: consumer,
        config: ["client.id": "fuzz"],
        name: pick([:fuzz_sup_name, {:global, :fuzz_sup}])
      ],
      fn ->
        pick_pair(
          connection: pick([:fuzz_conn, nil, "c"]),
          endpoints: bad_endpoints(),
          config: client_config(),
          producer: bad(),
          group_consumer: group_consumer(ctx),
          consumer: consumer(ctx),
          name: pick([{:via, :nope, 1}, "n", 1])
        )
      end
    )
  end

  # `required` and some of `optional`; in half of the cases one entry replaced by `bad_pair`'s.
  defp mutated(required, optional, bad_pair) do
    kept = required ++ Enum.filter(optional, fn _ -> :rand.uniform(2) == 1 end)

    if :rand.uniform(2) == 1 do
      case bad_pair.() do
        {key, value} -> Keyword.put(kept, key, value)
        nil -> kept
      end
    else
      kept
    end
  end

  defp pick_pair(list) when is_list(list) and list != [] do
    if Keyword.keyword?(list), do: pick(list), else: nil
  end

  defp pick_pair(_), do: nil

  defp group_consumer(ctx) do
    opts(
      group: fn -> pick(["fuzz-sg-#{:rand.uniform(3)}", "", <<255>>, "a\0b", nil, :g]) end,
      topics: fn ->
        pick([[ctx.topic], [unknown_topic()], [ctx.topic | :x], [], [bad_topic()], ctx.topic])
      end,
      handler: &handler/0,
      config: fn ->
        pick([
          ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000],
          ["session.timeout.ms": 1],
          consumer_config()
        ])
      end,
      begin_offset: fn -> pick([:earliest, :latest, 5, nil, "earliest"]) end,
      max_batch: fn -> small_or_bad(1..100, [0, -1, 1 <<< 40]) end,
      max_backlog: fn -> small_or_bad(1..1000, [0, -1, 1 <<< 40]) end,
      max_buffered_bytes: fn -> small_or_bad(8_388_608..268_435_456, [0, -1, 1 <<< 50, nil]) end,
      assignment_strategy: fn -> pick([:cooperative_sticky, :range, :roundrobin, :x, nil]) end,
      drain_timeout: fn -> small_or_bad(0..1000, [-1, 1 <<< 40, nil]) end,
      shutdown_timeout: fn -> small_or_bad(0..1000, [-1, 1 <<< 40]) end,
      max_attempts: fn -> pick([:infinity, 1, 3, 0, -1, 1 <<< 40, nil]) end,
      on_failure: fn ->
        pick([:retry, :skip, {:dead_letter, ctx.topic}, {:dead_letter, <<255>>}, :x, nil])
      end,
      offsets: fn ->
        pick([:kafka, {:elsewhere, fun(:offsets)}, {:elsewhere, fun(:keep_all)}, :x, nil])
      end,
      assignment_received_handler: fn -> pick([fun(:assigned), fun(:keep_all), nil]) end,
      assignments_revoked_handler: fn -> pick([fun(:revoked), fun(:keep_all), nil]) end
    )
  end

  defp consumer(ctx) do
    opts(
      topic: fn -> topic(ctx) end,
      partition: fn -> pick([:all, 0, 2, 3, 99, -1, 1 <<< 31, nil]) end,
      handler: &handler/0,
      begin_offset: fn -> pick([:earliest, :latest, 0, 3, -1, 1 <<< 70, nil]) end,
      max_batch: fn -> small_or_bad(1..100, [0, -1, 1 <<< 40]) end,
      config: &consumer_config/0
    )
  end

  defp handler,
    do: pick([Ottla.BadInput.Handler, Ottla.BadInput.Handler, nil, :nope, Enum, "h", 1])

  defp produce_opts(_ctx, network?) do
    opts(
      partition: fn -> pick([0, 1, 2, 3, 99, -1, 1 <<< 31, nil, "0"]) end,
      partitioner: fn ->
        pick([
          :default,
          :random,
          :md5,
          Ottla.Partitioner.Default,
          Ottla.TestPartitioner,
          fun(:arity2),
          fun(:bad_partition),
          fun(:keep_all),
          :nope,
          nil,
          Enum
        ])
      end,
      timeout: fn -> if network?, do: timeout(), else: timeout_or_bad() end,
      config: &client_config/0,
      connection: fn -> pick([:fuzz_conn, :fuzz_noprod, :never_started, nil, "c", 1]) end
    )
  end

  # A keyword list of some of `gens`' options (each generated), plus sometimes an unknown
  # option, a duplicate or a non-keyword term.
  defp opts(gens) do
    kept = for {key, gen} <- gens, :rand.uniform(3) > 1, do: {key, gen.()}

    # A call that reaches the network always gets a short timeout.
    kept =
      if Keyword.has_key?(gens, :timeout) and not Keyword.has_key?(kept, :timeout),
        do: kept ++ [timeout: timeout()],
        else: kept

    weighted([
      {14, fn -> Enum.shuffle(kept) end},
      {1, fn -> kept ++ [{:no_such_option, 1}] end},
      {1, fn -> improper(kept) end},
      {1, fn -> [{"timeout", 1000} | kept] end},
      # [] would mean the default timeout (10 to 30 s) with a broker that never answers.
      {1, fn -> with [] <- bad(), do: [timeout: timeout()] end}
    ])
  end

  ## Values

  defp target(ctx, network? \\ true) do
    weighted([
      {10, fn -> {ctx.endpoints, true} end},
      {3, fn -> {[{"127.0.0.1", port(ctx.endpoints)}], true} end},
      {2, fn -> {[localhost: port(ctx.endpoints)], true} end},
      {1, fn -> {[{~c"127.0.0.1", port(ctx.endpoints)}], true} end},
      {8, fn -> {ctx.mock, true} end},
      {6, fn -> {:fuzz_conn, true} end},
      {2, fn -> {:fuzz_txn, true} end},
      {2, fn -> {:fuzz_noprod, true} end},
      {3, fn -> {:never_started, false} end},
      {2, fn -> {:fuzz_stopped, false} end},
      {1, fn -> {[{"127.0.0.1", 1}], true} end},
      {1, fn -> {"127.0.0.1:1", true} end},
      {8, fn -> {bad_endpoints(), false} end}
    ])
    |> then(fn {t, n} -> {t, n and network?} end)
  end

  defp unreachable?(target), do: target in [[{"127.0.0.1", 1}], "127.0.0.1:1"]

  defp port(endpoints),
    do: endpoints |> String.split(":") |> List.last() |> String.to_integer()

  defp bad_endpoints do
    pick([
      nil,
      [],
      "",
      ",",
      "host",
      "host:",
      ":9092",
      "host:port",
      "host:0",
      "host:70000",
      "a b:1",
      <<255, ?:, ?1>>,
      "a\0b:1",
      [{"127.0.0.1", 9092} | :tail],
      [{~c"localhost", 0}],
      [{[-1], 1}],
      [{[0xD800], 1}],
      [{[:a], 1}],
      [{[?a | ?b], 1}],
      [{<<255>>, 1}],
      [{"", 1}],
      [{nil, 1}],
      [{:localhost, 0}],
      [{:localhost, -1}],
      [{:localhost, 1 <<< 64}],
      [{:localhost, "9092"}],
      [localhost: 9092, other: nil],
      [{"a", 1, 2}],
      [1, 2],
      %{localhost: 9092},
      {:localhost, 9092},
      1,
      1.5,
      dead_pid(),
      make_ref(),
      deep(20)
    ])
  end

  defp connection,
    do:
      pick([
        :fuzz_conn,
        :fuzz_consumer,
        :fuzz_group,
        :fuzz_noprod,
        :never_started,
        :fuzz_stopped,
        nil,
        true,
        "fuzz_conn",
        1,
        [],
        {:fuzz_conn},
        self()
      ])

  defp topic(ctx) do
    weighted([
      {6, fn -> ctx.topic end},
      {3, fn -> ctx.mock_topic end},
      {2, &unknown_topic/0},
      {3, &bad_topic/0}
    ])
  end

  defp pool_topic(ctx), do: "fuzz-pool-#{ctx.seed}-#{:rand.uniform(8)}"
  defp unknown_topic, do: "fuzz-unknown-#{:rand.uniform(1_000_000)}"

  defp bad_topic do
    pick([
      "",
      nil,
      :topic,
      1,
      ~c"topic",
      <<255, 254>>,
      "a\0b",
      <<0>>,
      String.duplicate("t", 250),
      String.duplicate("ä", 125),
      "with space",
      "ä",
      [<<"t">>],
      {"t"},
      deep(10)
    ])
  end

  defp partition, do: pick([0, 1, 2, 3, 99, -1, 1 <<< 31, 1 <<< 64, nil, "0", 1.0, :all])

  defp offset,
    do: pick([0, 1, 10, -1, 1 <<< 62, (1 <<< 63) - 1, 1 <<< 63, 1 <<< 100, nil, "1", 2.5])

  defp generation,
    do: pick([nil, 0, 1, 2, -1, (1 <<< 31) - 1, 1 <<< 31, -(1 <<< 31) - 1, 1 <<< 80, "1", 1.0])

  defp timeout, do: 500 + :rand.uniform(1_500)

  defp timeout_or_bad,
    do: weighted([{4, &timeout/0}, {1, fn -> pick([0, -1, 1 <<< 64, nil, :infinity, 1.0]) end}])

  defp small_or_bad(range, bad),
    do: weighted([{3, fn -> Enum.random(range) end}, {1, fn -> pick(bad) end}])

  defp messages do
    weighted([
      {4, &message/0},
      {6, fn -> for _ <- 1..:rand.uniform(5), do: message() end},
      {1, fn -> [] end},
      {1, fn -> improper([message(), message()]) end},
      {1, &bad/0}
    ])
  end

  defp message do
    weighted([
      {5, fn -> value() end},
      {3, fn -> {key(), value()} end},
      {4, fn -> map_message() end},
      {1, fn -> [value(), [value()]] end},
      {1, fn -> pick([nil, 1, :atom, {1, 2, 3}, [1 <<< 9], [-1], deep(30), %{key: "k"}]) end}
    ])
  end

  defp map_message do
    base = %{value: value()}

    base = if :rand.uniform(2) == 1, do: Map.put(base, :key, key()), else: base

    base = if :rand.uniform(2) == 1, do: Map.put(base, :headers, headers()), else: base

    if :rand.uniform(3) == 1,
      do:
        Map.put(
          base,
          :timestamp,
          pick([0, 1_700_000_000_000, -1, (1 <<< 63) - 1, 1 <<< 63, 1 <<< 70, 1.5, "1", nil])
        ),
      else: base
  end

  defp headers do
    pick([
      [],
      [{"h", "v"}],
      [{"h", nil}],
      [{:h, "v"}],
      [{nil, "v"}],
      [{<<255>>, "v"}],
      [{"a\0b", "v"}],
      [{"h", <<255, 0>>}],
      [{"h", 1}],
      [{1, "v"}],
      [{"h", "v"} | :tail],
      [{"h", "v", "x"}],
      %{"h" => "v"},
      "h",
      deep(5)
    ])
  end

  defp key,
    do: weighted([{4, fn -> pick(["k", "", nil, <<255, 0>>, ["k", ?1]]) end}, {1, &value/0}])

  defp value do
    weighted([
      {8, fn -> pick(["v", "", "ä", <<255, 0, 1>>, String.duplicate("x", 1000)]) end},
      {2, fn -> pick([["a", ?b, ["c"]], ["a" | "b"], [1 <<< 20], [-1], [:a], nil]) end},
      # Over message.max.bytes (1,000,000 by default).
      {1, fn -> if :rand.uniform(40) == 1, do: :binary.copy("x", 10_000_000), else: "v" end}
    ])
  end

  defp client_config do
    weighted([
      {6, fn -> [] end},
      {3, fn -> ["client.id": "fuzz"] end},
      {1, fn -> ["no.such.property": "1"] end},
      {1, fn -> ["linger.ms": "abc"] end},
      {1, fn -> ["linger.ms": 1 <<< 70] end},
      {1, fn -> ["group.id": "x"] end},
      {1, fn -> ["bootstrap.servers": "x:1"] end},
      {1, fn -> [{"client.id", <<255>>}] end},
      {1, fn -> [{"client.id", "a\0b"}] end},
      {1, fn -> [{<<255>>, "1"}] end},
      {1, fn -> [{"", "1"}] end},
      {1, fn -> [{"client.id", nil}] end},
      {1, fn -> [{"client.id", ["x"]}] end},
      {1, fn -> [{"client.id", "x"} | :tail] end},
      {1, fn -> %{"client.id" => "x"} end},
      {1, fn -> [client_id: "fuzz", required_acks: :all] end},
      {1, fn -> [required_acks: 7] end},
      {1, fn -> [ssl: [password: %{}]] end},
      {1, fn -> [ssl: [{:cacertfile, [-1]}]] end},
      {1, fn -> [ssl: [{:cacertfile, "/nonexistent"} | :tail]] end},
      {1, fn -> [sasl: {:plain, "u", <<255>>}] end},
      {1, fn -> [session_timeout_seconds: 1 <<< 60] end},
      {1, fn -> [begin_offset: :earliest] end},
      {1, &bad/0}
    ])
  end

  defp consumer_config do
    weighted([
      {4, fn -> ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000] end},
      {2, &client_config/0},
      {1, fn -> ["enable.auto.commit": true] end},
      {1, fn -> ["group.protocol": "consumer"] end},
      {1, fn -> ["group.protocol": "consumer", "session.timeout.ms": 10_000] end},
      {1, fn -> ["fetch.max.bytes": -1] end}
    ])
  end

  defp topic_config do
    pick([
      [],
      ["retention.ms": 60_000],
      ["retention.ms": "abc"],
      ["no.such.config": "1"],
      [{"retention.ms", <<255>>}],
      [{"retention.ms", 1} | :x],
      nil,
      deep(5)
    ])
  end

  # A term of no expected shape.
  defp bad do
    pick([
      nil,
      true,
      :atom,
      0,
      -1,
      1 <<< 64,
      -(1 <<< 64),
      1.5,
      "",
      "string",
      <<255, 0>>,
      [],
      [1, 2],
      [:a | :b],
      {},
      {:a, 1},
      %{},
      %{a: 1},
      dead_pid(),
      make_ref(),
      fun(:keep_all),
      deep(50)
    ])
  end

  # Calls are generated in the test's VM and run in the peer: a pid of this VM would name
  # some process of the peer. This one is never alive in either (serial 1).
  defp dead_pid, do: :c.pid(0, 32_767, 1)

  defp deep(0), do: :bottom

  defp deep(n) do
    inner = deep(n - 1)
    pick([[inner], {inner}, %{k: inner}, [a: inner]])
  end

  defp improper([]), do: [:x | :tail]
  defp improper(list), do: list |> Enum.reverse() |> Enum.reduce(:tail, &[&1 | &2])

  defp pick(list), do: Enum.at(list, :rand.uniform(length(list)) - 1)

  defp weighted(choices) do
    total = choices |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    at = :rand.uniform(total)

    Enum.reduce_while(choices, at, fn {weight, gen}, left ->
      if left <= weight, do: {:halt, gen.()}, else: {:cont, left - weight}
    end)
  end

  # Sometimes a call leaves out its optional last argument.
  defp maybe_drop_last(args, min_arity) do
    if length(args) > min_arity and :rand.uniform(4) == 1, do: Enum.drop(args, -1), else: args
  end

  ## Functions given as arguments (named, so a reproducer can name them)

  @doc "The functions the generator passes as arguments, by name."
  def fun(:keep_all), do: &Ottla.BadInput.Funs.keep_all/1
  def fun(:arity2), do: &Ottla.BadInput.Funs.first_partition/2
  def fun(:bad_partition), do: &Ottla.BadInput.Funs.bad_partition/2
  def fun(:offsets), do: &Ottla.BadInput.Funs.no_offset/2
  def fun(:assigned), do: &Ottla.BadInput.Funs.assigned/4
  def fun(:revoked), do: &Ottla.BadInput.Funs.revoked/0

  @funs [:keep_all, :arity2, :bad_partition, :offsets, :assigned, :revoked]

  @doc "The public function a call exercises, e.g. `Ottla.produce/4`."
  def function(%{mfa: {Ottla.BadInput.Runner, :take_stream, [fun, args]}}),
    do: "Ottla.Fetch.#{fun}/#{length(args)}"

  def function(%{mfa: {m, f, args}}), do: "#{inspect(m)}.#{f}/#{length(args)}"

  ## Reproducers

  @doc "The call as Elixir code that can be pasted into `iex -S mix` (with the context's values)."
  def render(%{mfa: {m, f, args}}) do
    "#{inspect(m)}.#{f}(#{Enum.map_join(args, ", ", &render_term/1)})"
  end

  defp render_term(bin) when is_binary(bin) and byte_size(bin) > 200 do
    <<byte, _::binary>> = bin

    if bin == :binary.copy(<<byte>>, byte_size(bin)),
      do: ":binary.copy(#{inspect(<<byte>>)}, #{byte_size(bin)})",
      else: inspect(bin, limit: :infinity, printable_limit: :infinity)
  end

  defp render_term(list) when is_list(list), do: "[" <> render_list(list) <> "]"

  defp render_term(tuple) when is_tuple(tuple),
    do: "{" <> Enum.map_join(Tuple.to_list(tuple), ", ", &render_term/1) <> "}"

  defp render_term(%module{} = struct) do
    fields =
      struct
      |> Map.from_struct()
      |> Enum.map_join(", ", fn {k, v} -> "#{k}: #{render_term(v)}" end)

    "%#{inspect(module)}{#{fields}}"
  end

  defp render_term(map) when is_map(map),
    do:
      "%{" <>
        Enum.map_join(map, ", ", fn {k, v} -> "#{render_term(k)} => #{render_term(v)}" end) <> "}"

  defp render_term(fun) when is_function(fun) do
    case Enum.find(@funs, &(fun(&1) == fun)) do
      nil -> inspect(fun)
      name -> "Ottla.BadInput.fun(#{inspect(name)})"
    end
  end

  defp render_term(pid) when is_pid(pid), do: ":c.pid(0, 32_767, 1)"
  defp render_term(ref) when is_reference(ref), do: "make_ref()"
  defp render_term(other), do: inspect(other, limit: :infinity, printable_limit: :infinity)

  defp render_list([]), do: ""
  defp render_list([last]), do: render_term(last)

  defp render_list([head | tail]) when is_list(tail),
    do: render_term(head) <> ", " <> render_list(tail)

  defp render_list([head | tail]), do: render_term(head) <> " | " <> render_term(tail)

  ## Verdicts

  @doc """
  `:ok` when `outcome` (from `Runner.run/2`) is documented for a call expecting `expect`,
  or `{:defect, why}`. Raising `ArgumentError` is always allowed, unless it is the NIF's or a
  BIF's bare one (which names no argument).
  """
  def classify(expect, outcome)

  def classify(_expect, {:raised, ArgumentError, message}) do
    if message == "argument error" or
         String.starts_with?(message, "errors were found at the given arguments"),
       do: {:defect, "a bare ArgumentError naming no argument: #{message}"},
       else: :ok
  end

  def classify(expect, {:raised, Ottla.Error, _})
      when expect in [:boolean_or_raise, :stream],
      do: :ok

  def classify(:await, {:raised, Ottla.Testing.TimeoutError, _}), do: :ok

  def classify(_expect, {:raised, module, message}),
    do: {:defect, "raised #{inspect(module)}: #{message}"}

  def classify(_expect, {:caught, kind, reason}), do: {:defect, "#{kind}: #{reason}"}
  def classify(_expect, {:hang, ms}), do: {:defect, "no answer within #{ms} ms"}
  def classify(_expect, {:cleanup_hang, ms}), do: {:defect, "cleanup took over #{ms} ms"}
  def classify(_expect, {:died, reason}), do: {:defect, "the calling process died: #{reason}"}

  def classify(expect, {:returned, value}) do
    if documented?(expect, value),
      do: :ok,
      else: {:defect, "returned #{inspect(value, limit: 12, printable_limit: 200)}"}
  end

  @doc "The kind of an outcome, for the summary."
  def kind({:returned, {:ok, pid}}) when is_pid(pid), do: :started
  def kind({:returned, {:error, {:already_started, _}}}), do: :already_started
  def kind({:returned, {:error, {:shutdown, _}}}), do: :start_failed
  def kind({:returned, {:error, %Ottla.Error{code: code}}}), do: {:error, code}
  def kind({:returned, {:error, %Ottla.Error{code: code}, _}}), do: {:error, code}
  def kind({:returned, {:error, _}}), do: :error_other
  def kind({:returned, _}), do: :returned
  def kind({:raised, ArgumentError, _}), do: :argument_error
  def kind({:raised, Ottla.Error, _}), do: :ottla_error_raised
  def kind(other), do: elem(other, 0)

  defp documented?(:produce, :ok), do: true

  defp documented?(:produce, {:error, %Ottla.Error{}, failed}) when is_list(failed),
    do: Enum.all?(failed, &match?({_, %Ottla.Error{}}, &1))

  defp documented?(:ok_or_error, :ok), do: true
  defp documented?(:ok_tuple, {:ok, _}), do: true
  defp documented?(:fetch, {:ok, hw, list}) when is_integer(hw) and is_list(list), do: true
  defp documented?(:boolean_or_raise, b) when is_boolean(b), do: true
  defp documented?(:boolean, b) when is_boolean(b), do: true
  defp documented?(:ack, :ok), do: true
  defp documented?(:await, :ok), do: true
  defp documented?(:await, list) when is_list(list), do: true
  defp documented?(:latest, nil), do: true
  defp documented?(:latest, n) when is_integer(n) and n >= 0, do: true
  defp documented?(:stream, list) when is_list(list), do: true
  defp documented?(:child_spec, %{id: _, start: {_, _, _}}), do: true
  defp documented?(:endpoints, list) when is_list(list), do: true
  defp documented?(:on_start, {:ok, pid}) when is_pid(pid), do: true
  defp documented?(:on_start, :ignore), do: true
  defp documented?(:on_start, {:error, reason}), do: clean_reason?(reason)

  defp documented?(expect, {:error, %Ottla.Error{}})
       when expect in [:ok_or_error, :ok_tuple, :fetch],
       do: true

  defp documented?(_, _), do: false

  # A start's error reason may carry Ottla.Error values and OTP's own wrappings, but no
  # crash: no exception other than Ottla.Error, no NIF panic, no badarg.
  defp clean_reason?(%Ottla.Error{}), do: true
  defp clean_reason?(%{__exception__: true}), do: false

  defp clean_reason?(atom) when atom in [:nif_panicked, :badarg, :function_clause, :undef],
    do: false

  defp clean_reason?({:badmatch, _}), do: false
  defp clean_reason?({:case_clause, _}), do: false

  defp clean_reason?(tuple) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.all?(&clean_reason?/1)

  defp clean_reason?([head | tail]), do: clean_reason?(head) and clean_reason?(tail)
  defp clean_reason?(_), do: true
end

defmodule Ottla.BadInput.Funs do
  @moduledoc false
  # Functions the generator passes as arguments.
  def keep_all(_), do: true
  def first_partition(_count, _key), do: 0
  def bad_partition(count, _key), do: count + 5
  def no_offset(_topic, _partition), do: nil
  def assigned(_group, _topic, _partition, _generation), do: :ok
  def revoked, do: :ok
end

defmodule Ottla.BadInput.RaisingPartitioner do
  @moduledoc false
  # A module with a partition/2 that is no partitioner: it raises.
  def partition(_count, key), do: String.to_integer(key)
end

defmodule Ottla.BadInput.Handler do
  @moduledoc false
  # Acks every batch; sends nothing.
  use Ottla.Consumer.MessageHandler
end
