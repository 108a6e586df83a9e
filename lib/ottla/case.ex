defmodule Ottla.Case do
  @moduledoc """
  An ExUnit case template for testing code that uses Ottla, on the embedded cluster
  (`Ottla.Testing`): no broker to install or start.

      defmodule MyApp.OrdersTest do
        use Ottla.Case, async: true

        test "an order is handled", %{endpoints: endpoints, topic: topic, group: group} do
          conn =
            start_connection!(
              group_consumer: [
                group: group,
                topics: [topic],
                handler: MyApp.OrderHandler,
                begin_offset: :earliest
              ]
            )

          await_assignment(conn)
          :ok = Ottla.produce(endpoints, topic, {"order-1", "2 apples"})
          :ok = await_acked(conn, topic)
        end
      end

  Each test's context holds:

    * `:endpoints` - the embedded cluster's endpoints.
    * `:topic` - a topic of this test alone, already created (with `:partitions`
      partitions).
    * `:group` - a consumer group name of this test alone.
    * `:connection` - a connection name of this test alone, the one `start_connection!/1`
      starts.

  and the test module imports `start_connection!/1` and `Ottla.Testing`'s wait helpers
  (`await_assignment/2`, `await_acked/3`, `await_committed/3`, `await_topic/3`) and faults
  (`broker_down/2`, `broker_up/2`, `set_latency/3`, `fail_requests/4`, `move_leader/4`,
  `move_coordinator/3`).

  When a test fails, its failure shows the state of the consumers it started with
  `start_connection!/1` at the moment it failed: per partition the generation, the backlog,
  the last delivered, acked and committed offsets, the high watermark and the lag.

  Tests sharing a module's cluster run one after another (ExUnit runs a module's tests in
  sequence); after each, brokers it took down come back up and latency it added is removed.
  Requests it made fail (`fail_requests/4`) and are not yet made stay failing: a test that
  leaves some should use `cluster: :test`.

  ## Options

    * `:async` - as `ExUnit.Case`'s. Defaults to `false`.
    * `:cluster` - `:module` (one embedded cluster for the module's tests, each with its own
      topic and group) or `:test` (one per test). Defaults to `:module`.
    * `:brokers` - the embedded cluster's brokers. Defaults to `1`.
    * `:partitions` - the partitions of each test's topic. Defaults to `1`; a test's
      `@tag partitions: n` overrides it.
  """

  @defaults [cluster: :module, brokers: 1, partitions: 1]
  @context {__MODULE__, :context}

  @doc false
  defmacro __using__(opts) do
    {case_opts, opts} = Keyword.split(opts, [:async, :register])
    opts = validate!(opts)

    quote do
      use ExUnit.Case, unquote(case_opts)
      import ExUnit.Case, only: [describe: 2, test: 1]
      import Ottla.Case, only: [test: 2, test: 3, start_connection!: 0, start_connection!: 1]

      import Ottla.Testing,
        only: [
          await_assignment: 1,
          await_assignment: 2,
          await_acked: 2,
          await_acked: 3,
          await_committed: 2,
          await_committed: 3,
          await_topic: 2,
          await_topic: 3,
          broker_down: 2,
          broker_up: 2,
          set_latency: 3,
          fail_requests: 3,
          fail_requests: 4,
          move_leader: 4,
          move_coordinator: 3
        ]

      setup_all do
        Ottla.Case.__setup_all__(unquote(opts))
      end

      setup context do
        Ottla.Case.__setup__(context, unquote(opts))
      end
    end
  end

  defp validate!(opts) do
    opts = Keyword.validate!(opts, @defaults)

    unless opts[:cluster] in [:module, :test],
      do:
        raise(
          ArgumentError,
          "invalid cluster #{inspect(opts[:cluster])}: expected :module or :test"
        )

    Ottla.Options.integer!(opts[:brokers], :brokers, 1, 32)
    Ottla.Options.integer!(opts[:partitions], :partitions, 1, 10_000)
    opts
  end

  @doc """
  Like `ExUnit.Case.test/3`; a failure adds the state of the test's consumers to its
  message.
  """
  defmacro test(message, var \\ quote(do: _), contents) do
    contents =
      case contents do
        [do: block] -> [do: quote(do: Ottla.Case.__report__(fn -> unquote(block) end))]
        other -> other
      end

    quote do
      ExUnit.Case.test(unquote(message), unquote(var), unquote(contents))
    end
  end

  @doc """
  Starts an `Ottla.Supervisor` under the test's supervisor (`start_supervised!/2`), with the
  test's `:connection` name and `:endpoints` unless `opts` names others, and returns the
  connection's name. `opts` are `Ottla.Supervisor`'s options.

      conn = start_connection!(producer: [])
      other = start_connection!(connection: :second, group_consumer: [...])
  """
  @spec start_connection!(keyword) :: atom
  def start_connection!(opts \\ []) do
    context =
      Process.get(@context) ||
        raise ArgumentError, "start_connection!/1 runs in a test of a module that uses Ottla.Case"

    opts = Keyword.merge([connection: context.connection, endpoints: context.endpoints], opts)
    name = opts[:connection]
    ExUnit.Callbacks.start_supervised!({Ottla.Supervisor, opts}, id: {Ottla.Case, name})
    Process.put(@context, %{context | started: [name | context.started]})
    name
  end

  @doc false
  def __setup_all__(opts) do
    if opts[:cluster] == :module, do: %{ottla_cluster: start_cluster!(opts)}, else: %{}
  end

  @doc false
  def __setup__(context, opts) do
    endpoints = context[:ottla_cluster] || start_cluster!(opts)
    partitions = Ottla.Options.integer!(context[:partitions] || opts[:partitions], :partitions, 1)
    n = System.unique_integer([:positive])
    topic = "#{slug(context)}-#{n}"

    case Ottla.create_topic(endpoints, topic, partitions: partitions) do
      :ok -> :ok
      {:error, error} -> raise error
    end

    ours = %{
      endpoints: endpoints,
      topic: topic,
      group: "#{topic}-group",
      connection: :"ottla_case_#{n}"
    }

    Process.put(@context, Map.put(ours, :started, []))
    brokers = opts[:brokers]

    # A module's tests share its cluster: a broker a test took down, or slowed, is restored
    # for the next one.
    if context[:ottla_cluster] do
      ExUnit.Callbacks.on_exit(fn -> restore(endpoints, brokers) end)
    end

    ours
  end

  defp restore(endpoints, brokers) do
    for broker <- 1..brokers do
      Ottla.Testing.broker_up(endpoints, broker)
      Ottla.Testing.set_latency(endpoints, broker, 0)
    end
  rescue
    # The cluster is gone already.
    ArgumentError -> :ok
  end

  defp start_cluster!(opts) do
    pid = ExUnit.Callbacks.start_supervised!({Ottla.Testing, brokers: opts[:brokers]})
    Ottla.Testing.endpoints(pid)
  end

  # A topic name from the test's name: Kafka allows [a-zA-Z0-9._-], at most 249 characters.
  defp slug(context) do
    context.test
    |> Atom.to_string()
    |> String.replace(~r/[^a-zA-Z0-9._-]+/, "-")
    |> String.slice(0, 180)
  end

  @doc false
  # Runs a test's body; when it fails, the state of the test's connections joins the error.
  def __report__(body) do
    body.()
  rescue
    error ->
      reraise with_state(error), __STACKTRACE__
  end

  defp with_state(error) do
    case state_report() do
      "" ->
        error

      report ->
        case error do
          %{message: message} when is_binary(message) -> %{error | message: message <> report}
          _ -> with_printed(error, report)
        end
    end
  end

  defp with_printed(error, report) do
    IO.puts(report)
    error
  end

  @doc false
  # What the test's connections' consumers hold, one line per partition.
  def state_report do
    started = (Process.get(@context) || %{started: []}).started

    Enum.map_join(Enum.reverse(started), "", fn name ->
      case Ottla.stats(name) do
        {:ok, stats} ->
          "\n\nOttla consumer #{inspect(name)} " <>
            "(stale acks #{stats.stale_acks}, unheld #{stats.unheld_acks}, " <>
            "undelivered #{stats.undelivered_acks}):" <> partition_lines(stats.partitions)

        # A connection without a consumer (a producer's) has nothing to show.
        {:error, _} ->
          ""
      end
    end)
  end

  defp partition_lines([]), do: " no partitions held"

  defp partition_lines(rows) do
    Enum.map_join(rows, "", fn r ->
      "\n  #{r.topic}/#{r.partition}: generation #{inspect(r.generation_id)}, " <>
        "backlog #{r.backlog}, paused #{r[:paused?]}, last delivered #{inspect(r.last_delivered)}, " <>
        "last acked #{inspect(r.last_acked)}, committed #{inspect(r.committed)}, " <>
        "high watermark #{inspect(r.high_watermark)}, lag #{inspect(r.lag)}"
    end)
  end
end
