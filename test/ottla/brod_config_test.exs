defmodule Ottla.BrodConfigTest.Guide do
  @moduledoc false
  # Reads the brod option tables of guides/migrating-from-elsa.md: one row per brod option
  # value, under a heading that says which `config:` list it is for.

  @scopes %{
    "Client options" => :client,
    "Producer options" => :producer,
    "Consumer options" => :consumer,
    "Group consumer options" => :group,
    "Options of a consumer without a group" => :assign
  }

  def path, do: Path.expand("../../guides/migrating-from-elsa.md", __DIR__)

  @doc "The rows: `%{scope:, line:, option:, key:, claims:}`, in the guide's order."
  def rows do
    path()
    |> File.read!()
    |> String.split("\n")
    |> Enum.with_index(1)
    |> Enum.reduce({nil, []}, fn {line, number}, {scope, rows} ->
      cond do
        String.starts_with?(line, "## ") ->
          {nil, rows}

        String.starts_with?(line, "### ") ->
          {@scopes[String.trim_leading(line, "### ")], rows}

        scope != nil and String.starts_with?(line, "| `") ->
          {scope, [row(scope, line, number) | rows]}

        true ->
          {scope, rows}
      end
    end)
    |> elem(1)
    |> Enum.reverse()
  end

  defp row(scope, line, number) do
    [option_cell, ottla | _why] =
      line
      |> String.trim()
      |> String.trim_leading("|")
      |> String.trim_trailing("|")
      |> String.split(~r/(?<!\\)\|/)
      |> Enum.map(&(&1 |> String.replace("\\|", "|") |> String.trim()))

    [_, option] = Regex.run(~r/`([^`]+)`/, option_cell)
    [_, key] = Regex.run(~r/^([a-z_]+):/, option)
    spans = for [_, span] <- Regex.scan(~r/`([^`]+)`/, ottla), do: span
    prose = Regex.replace(~r/`[^`]*`/, ottla, "")

    %{
      scope: scope,
      line: number,
      option: option,
      key: String.to_atom(key),
      claims: %{
        properties:
          for(
            span <- spans,
            [_, k, v] <- [Regex.run(~r/^([a-z][a-z0-9_.-]*)=(.*)$/, span)],
            do: {k, v}
          ),
        options: for(span <- spans, Regex.match?(~r/^[a-z_]+: /, span), do: span),
        refused: prose =~ "refused",
        ignored: prose =~ "ignored",
        accepted: prose =~ "accepted",
        warning: prose =~ "with a warning"
      }
    }
  end
end

defmodule Ottla.BrodConfigTest do
  # The migration guide's tables of brod options, checked against the code and started with
  # the real broker: for every brod option one test, which checks each of the option's rows
  # (the properties and Ottla options it names, its warning or its refusal) and then starts
  # the consumer, producer or connection with that row's config and sees it consume or
  # deliver. Not async: the warnings the rows promise are logged once per VM, so each check
  # first makes the VM forget them.
  use ExUnit.Case, async: false

  import Bitwise
  import ExUnit.CaptureLog
  import Ottla.TestSupport

  alias Ottla.BrodConfigTest.Guide

  @moduletag timeout: 600_000

  @rows Guide.rows()

  setup_all do
    # brod's {mechanism, file} form: the user on the first line, the password on the second.
    path = Path.join(System.tmp_dir!(), "ottla-sasl-#{System.unique_integer([:positive])}")
    File.write!(path, "user\nsecret\n")
    on_exit(fn -> File.rm(path) end)
    %{binding: [path: path]}
  end

  describe "the guide's tables" do
    test "are there, and each row claims something the test checks" do
      for scope <- [:client, :producer, :consumer, :group, :assign] do
        assert Enum.any?(@rows, &(&1.scope == scope)), "no #{scope} table in #{Guide.path()}"
      end

      for row <- @rows do
        %{properties: props, options: opts} = claims = row.claims
        flags = Map.take(claims, [:refused, :ignored, :accepted, :warning])

        assert props != [] or opts != [] or Enum.any?(Map.values(flags)),
               "guide line #{row.line} (#{row.option}) claims nothing checkable"
      end
    end

    test "name every brod option the code knows, and only those" do
      in_guide = @rows |> Enum.map(& &1.key) |> MapSet.new()
      known = MapSet.new(Ottla.BrodConfig.known_options())

      assert MapSet.difference(known, in_guide) |> Enum.sort() == [],
             "brod options the code handles but the guide's tables do not list"

      assert MapSet.difference(in_guide, known) |> Enum.sort() == [],
             "options in the guide's tables the code does not know"
    end
  end

  # One test per brod option: its rows' claims, then a real start with each row's config.
  # (group_by keeps the guide's order within each option.)
  for {{scope, key}, rows} <- Enum.group_by(@rows, &{&1.scope, &1.key}) do
    @tag rows: rows
    test "#{scope} option #{key} (guide lines #{Enum.map_join(rows, ", ", & &1.line)}): each value does what the guide says, and starts",
         ctx do
      for row <- ctx.rows, do: check_row!(row, ctx.binding)

      ctx.rows
      |> Enum.reject(& &1.claims.refused)
      |> Task.async_stream(&start_row(&1, ctx.binding),
        timeout: 120_000,
        ordered: true,
        max_concurrency: 8
      )
      |> Enum.zip(Enum.reject(ctx.rows, & &1.claims.refused))
      |> Enum.each(fn {{:ok, result}, row} ->
        assert result == :ok, "guide line #{row.line} (#{row.option}): #{result}"
      end)
    end
  end

  describe "values outside the tables" do
    test "a value of the wrong type is refused naming its option" do
      for {key, value} <- [
            connect_timeout: "5s",
            max_bytes: -1,
            min_bytes: :none,
            max_wait_time: -5,
            sleep_timeout: 1.5,
            prefetch_bytes: "1MB",
            max_linger_ms: -1,
            max_linger_count: :all,
            retry_backoff_ms: nil,
            reconnect_cool_down_seconds: -1,
            allow_topic_auto_creation: "yes",
            extra_sock_opts: :fast,
            share_leader_conn: 1,
            partition_buffer_limit: 0,
            client_id: 42,
            ssl: "yes",
            sasl: {:plain, :nobody},
            offset_commit_interval_seconds: -1,
            offset_commit_policy: :somewhere
          ] do
        error =
          assert_raise ArgumentError, fn ->
            Ottla.BrodConfig.translate([{key, value}], :config)
          end

        assert error.message =~ Atom.to_string(key),
               "#{inspect({key, value})}: #{error.message}"
      end
    end

    test "any term as any option's value: a translation or an ArgumentError naming the option" do
      terms = [
        nil,
        true,
        -1,
        0,
        1 <<< 70,
        -(1 <<< 70),
        1.5,
        "text",
        <<255>>,
        "",
        :atom,
        ~c"chars",
        [],
        [:a],
        [a: 1],
        [1 | 2],
        [{:cacertfile, 1 <<< 70}],
        [{:sndbuf, -1}],
        [{}],
        {},
        {:a},
        {:plain, nil},
        {:plain, "u", nil},
        {:scram_sha_256, ~c"u", ~c"p"},
        {:callback, nil, nil},
        %{},
        %{a: 1},
        self(),
        make_ref(),
        fn -> :ok end
      ]

      for key <- Ottla.BrodConfig.known_options(), term <- terms do
        try do
          {props, opts} = Ottla.BrodConfig.translate([{key, term}], :config)
          assert is_list(props) and Keyword.keyword?(opts)
        rescue
          error in ArgumentError ->
            assert error.message =~ Atom.to_string(key),
                   "#{inspect({key, term})}: #{error.message}"
        end
      end
    end

    test "brod's sasl file form: an unreadable or malformed file is refused without its content" do
      missing =
        Path.join(System.tmp_dir!(), "ottla-no-such-#{System.unique_integer([:positive])}")

      error =
        assert_raise ArgumentError, fn ->
          Ottla.BrodConfig.translate([sasl: {:plain, missing}], :config)
        end

      assert error.message =~ ":sasl" and error.message =~ missing

      one_line = missing <> "-one-line"
      File.write!(one_line, "only-a-secret-password")
      on_exit(fn -> File.rm(one_line) end)

      error =
        assert_raise ArgumentError, fn ->
          Ottla.BrodConfig.translate([sasl: {:scram_sha_256, String.to_charlist(one_line)}], :c)
        end

      assert error.message =~ "second"
      refute error.message =~ "only-a-secret-password"
    end

    test "a long max_wait_time leaves a request_timeout of the same list alone" do
      {props, []} =
        Ottla.BrodConfig.translate(
          [min_bytes: 1, max_wait_time: 120_000, request_timeout: 200_000],
          :c
        )

      assert {"socket.timeout.ms", 200_000} in props
      refute {"socket.timeout.ms", 121_000} in props
    end

    test "a brod name and a librdkafka property for the same setting: the later one wins" do
      assert [{"fetch.min.bytes", "1"}, {"fetch.wait.max.ms", "50"} | _] =
               [min_bytes: 0, "fetch.wait.max.ms": 50]
               |> Ottla.Options.kafka_config!()
               |> Enum.reverse()
               |> Enum.uniq_by(&elem(&1, 0))
               |> Enum.sort()

      assert {"fetch.wait.max.ms", "1000"} ==
               ["fetch.wait.max.ms": 50, min_bytes: 0]
               |> Ottla.Options.kafka_config!()
               |> Enum.reverse()
               |> List.keyfind("fetch.wait.max.ms", 0)
    end

    test "a map config is translated like a keyword list" do
      assert {[{"queued.min.messages", 10}], [begin_offset: :earliest]} =
               Ottla.BrodConfig.translate(%{prefetch_count: 10, begin_offset: :earliest}, :c)
    end
  end

  # -- checking a row against the code ---------------------------------------------------------

  defp check_row!(row, binding) do
    config = config!(row, binding)

    targets =
      case row.scope do
        :consumer -> [:group, :assign]
        scope -> [scope]
      end

    for target <- targets do
      Ottla.BrodConfig.forget_warnings()

      {result, log} =
        with_log(fn ->
          try do
            {:ok, outcome(target, config)}
          rescue
            error in ArgumentError -> {:raised, error}
          end
        end)

      where = "guide line #{row.line} (#{row.option}, #{target})"
      keys = config |> Keyword.keys() |> Enum.map(&Atom.to_string/1)
      claims = row.claims

      case {claims.refused, result} do
        {true, {:raised, error}} ->
          assert Enum.any?(keys, &(error.message =~ &1)),
                 "#{where}: the refusal does not name the option: #{error.message}"

        {true, {:ok, _}} ->
          flunk("#{where}: the guide says refused, but it was accepted: #{inspect(result)}")

        {false, {:raised, error}} ->
          flunk("#{where}: refused: #{error.message}")

        {false, {:ok, {props, options}}} ->
          check_claims!(where, claims, config, keys, props, options, log)
      end
    end
  end

  defp check_claims!(where, claims, config, keys, props, options, log) do
    final = Map.new(props)

    for {property, value} <- claims.properties do
      assert Map.fetch(final, property) == {:ok, value},
             "#{where}: #{property} is #{inspect(Map.get(final, property))}, the guide says #{value}"
    end

    for text <- claims.options, {option, value} <- eval!(text, where) do
      assert Map.fetch(options, option) == {:ok, value},
             "#{where}: #{option} is #{inspect(Map.get(options, option))}, the guide says #{inspect(value)}"
    end

    if claims.ignored or claims.accepted do
      assert Ottla.BrodConfig.translate(config, :config) == {[], []},
             "#{where}: the guide says it sets nothing"
    end

    if claims.warning or claims.ignored do
      assert Enum.any?(keys, &(log =~ &1)), "#{where}: no warning names it; log: #{log}"
    else
      refute Enum.any?(keys, &(log =~ &1)), "#{where}: an unexpected warning: #{log}"
    end
  end

  defp config!(row, binding) do
    {config, _} = Code.eval_string("[#{row.option}]", binding)
    config
  end

  defp eval!(text, where) do
    {options, _} = Code.eval_string("[#{text}]")
    assert Keyword.keyword?(options), "#{where}: #{text} is not an option"
    options
  end

  # What the code makes of a config: the librdkafka properties that reach the client (the
  # last value of each wins) and the Ottla options.
  defp outcome(:client, config), do: {Ottla.Options.kafka_config!(config), %{}}

  defp outcome(:producer, config),
    do:
      {Ottla.Connection.producer_defaults() ++ Ottla.Options.kafka_config!(config, :producer),
       %{}}

  defp outcome(kind, config) when kind in [:group, :assign] do
    opts = consumer_options(kind, config, "t", self())
    options = consumer_map(kind, opts)
    {options.props, options}
  end

  defp consumer_map(:group, opts), do: Ottla.Consumer.Options.group!(opts, conn())
  defp consumer_map(:assign, opts), do: Ottla.Consumer.Options.assign!(opts, conn())

  defp conn, do: [connection: :brod_config_test, bootstrap: endpoints(), config: []]

  # The options a test consumer starts with. Without brod's begin_offset or
  # offset_reset_policy it starts at the earliest, so a message produced first proves it
  # consumes.
  defp consumer_options(kind, config, topic, pid) do
    begin =
      if Keyword.has_key?(config, :begin_offset) or
           Keyword.has_key?(config, :offset_reset_policy),
         do: [],
         else: [begin_offset: :earliest]

    common = [handler: Ottla.TestHandler, handler_init_args: %{pid: pid}, config: config]

    case kind do
      :group -> [group: group_name(), topics: [topic]] ++ begin ++ common
      :assign -> [topic: topic] ++ begin ++ common
    end
  end

  # -- starting a row's config with the real broker -----------------------------------------------

  # Runs in its own task (the handler reports to it); returns :ok or what went wrong.
  defp start_row(row, binding) do
    # A start the broker or librdkafka refuses exits the starter too: report it instead.
    Process.flag(:trap_exit, true)
    config = config!(row, binding)

    case row.scope do
      :consumer ->
        [:group, :assign]
        |> Task.async_stream(&start_consumer(&1, config), timeout: 120_000)
        |> Enum.find_value(:ok, fn {:ok, result} -> if result != :ok, do: result end)

      kind when kind in [:group, :assign] ->
        consume(kind, config)

      :producer ->
        produce(producer: config)

      :client ->
        produce(connection: config)
    end
  rescue
    error -> Exception.message(error)
  end

  defp start_consumer(kind, config) do
    Process.flag(:trap_exit, true)
    consume(kind, config)
  rescue
    error -> Exception.message(error)
  end

  defp consume(kind, config) do
    topic = create_topic!()
    opts = consumer_options(kind, config, topic, self())
    begin = consumer_map(kind, opts).begin_offset

    # Enough messages before the start for an integer :begin_offset to skip some.
    first = if is_integer(begin), do: begin + 3, else: 1
    :ok = Ottla.produce(endpoints(), topic, for(i <- 0..(first - 1), do: "before-#{i}"))

    with_connection([{if(kind == :group, do: :group_consumer, else: :consumer), opts}], fn name ->
      assert is_atom(name), "the #{kind} consumer did not start: #{inspect(name)}"

      case begin do
        :earliest ->
          assert_receive {:batch, _, ^topic, 0, [%{offset: 0, value: "before-0"} | _]}, 30_000

        :latest ->
          delivered = produce_until_delivered(topic, deadline(30_000))

          refute Enum.any?(delivered, &String.starts_with?(&1.value, "before")),
                 "#{inspect(delivered)}"

        offset ->
          assert_receive {:batch, _, ^topic, 0, [%{offset: ^offset} | _]}, 30_000
      end

      :ok
    end)
  end

  defp produce(config) do
    topic = create_topic!()

    {producer_config, connection_config} =
      case config do
        [producer: c] -> {c, []}
        [connection: c] -> {[], c}
      end

    secured? =
      Enum.any?(
        Ottla.Options.kafka_config!(connection_config),
        &(elem(&1, 0) == "security.protocol")
      )

    # The plaintext test broker cannot serve TLS or SASL (test/ottla/security_test.exs does,
    # with a secured broker): there the client must start and fail with an Ottla.Error.
    consumer =
      if secured?,
        do: [],
        else: [
          group_consumer: consumer_options(:group, [], topic, self())
        ]

    with_connection(
      [config: connection_config, producer: [topic: topic, config: producer_config]] ++ consumer,
      fn
        {:error, _} when secured? ->
          :ok

        name when secured? ->
          assert {:error, %Ottla.Error{}, [{"v", %Ottla.Error{}}]} =
                   Ottla.produce(name, topic, "v", timeout: 3_000)

          :ok

        name ->
          assert :ok == Ottla.produce(name, topic, "v")
          # acks=0 returns once sent: the broker may append it a moment later.
          wait_until(fn -> match?({1, [%{value: "v"}]}, fetch_all!(topic, 0)) end, 10_000)

          if consumer != [],
            do: assert_receive({:batch, _, ^topic, 0, [%{value: "v"}]}, 30_000)

          :ok
      end
    )
  end

  # Starts a connection owned by the calling task, runs `fun` with its name (or the start's
  # error), and stops it.
  defp with_connection(opts, fun) do
    name = conn_name()

    case Ottla.Supervisor.start_link([connection: name, endpoints: endpoints()] ++ opts) do
      {:ok, pid} ->
        try do
          fun.(name)
        after
          Supervisor.stop(pid)
        end

      {:error, _} = error ->
        fun.(error)
    end
  end

  # brod's :latest: produce until the consumer, started, delivers one of these.
  defp produce_until_delivered(topic, deadline) do
    :ok = Ottla.produce(endpoints(), topic, "after-#{System.unique_integer([:positive])}")

    receive do
      {:batch, _, ^topic, _, messages} -> messages
    after
      1_000 ->
        if System.monotonic_time(:millisecond) > deadline,
          do: flunk("nothing delivered from #{topic}"),
          else: produce_until_delivered(topic, deadline)
    end
  end

  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms
end
