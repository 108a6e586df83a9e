defmodule Ottla.Group.Manager do
  @moduledoc false
  # Owns a connection's native consumer and starts its workers. The NIF's partition state
  # machines own each partition's lifecycle; the manager carries out what needs a process:
  # on an assignment it starts a worker per partition; when a worker dies unexpectedly it
  # tells the NIF (which keeps the unacked messages) and starts another with backoff; when the
  # NIF has finished a revocation it forgets those partitions. Revocations themselves are
  # carried out by the consumer's revoker (`Ottla.Consumer.Revoker`), which the NIF messages
  # directly, so a busy manager cannot delay one. A graceful stop drains like a revocation:
  # see `terminate/2`. The manager runs no user code: the handlers' `init/1` and
  # `assignment_received_handler` run in the workers.
  use GenServer
  require Logger

  alias Ottla.{Native, Telemetry}

  # How long the consumer's close (final commit, leaving the group) may take.
  @close_timeout 10_000

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @doc """
  The native consumer of a connection, or nil: its group consumer, or else its consumer
  without a group; `kind` `:consumer` asks for the latter only.
  """
  def resource(connection),
    do: :persistent_term.get({__MODULE__, connection}, nil) || resource(connection, :consumer)

  def resource(connection, :consumer),
    do: :persistent_term.get({__MODULE__, connection, :consumer}, nil)

  @doc """
  What a connection's running consumer reads: `{:topics, topics}` (a group subscribes to
  whole topics) or `{:partitions, [{topic, partition}]}` (a consumer without a group), or nil.
  """
  def subscription(connection),
    do:
      :persistent_term.get({__MODULE__, connection, :subscription}, nil) ||
        :persistent_term.get({__MODULE__, connection, :consumer, :subscription}, nil)

  @doc "Whether the connection's group consumer is exactly-once (acks only with transactions)."
  def exactly_once?(connection),
    do: :persistent_term.get({__MODULE__, connection, :exactly_once}, false)

  defp subscription_key(opts), do: Tuple.append(key(opts), :subscription)

  defp key(%{mode: :group, connection: connection}), do: {__MODULE__, connection}
  defp key(%{connection: connection}), do: {__MODULE__, connection, :consumer}

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    # Workers left by an earlier incarnation of this manager belong to a consumer that is
    # gone: stop them before a new one starts.
    for {_, pid, _, _} <- DynamicSupervisor.which_children(opts.worker_sup), is_pid(pid) do
      DynamicSupervisor.terminate_child(opts.worker_sup, pid)
    end

    {:ok, revoker} = Ottla.Consumer.Revoker.start_link(opts.assignments_revoked_handler)

    with {:ok, assignment} <- assignment(opts),
         {:ok, resource} <-
           Native.consumer_new(
             opts.bootstrap,
             opts.props,
             self(),
             revoker,
             opts.topics,
             assignment,
             Ottla.Consumer.Options.tuning(opts)
           ) do
      Ottla.Consumer.Revoker.serve(revoker, resource)
      :persistent_term.put(key(opts), resource)

      if opts.exactly_once,
        do: :persistent_term.put({__MODULE__, opts.connection, :exactly_once}, true)

      :persistent_term.put(
        subscription_key(opts),
        if(opts.mode == :group,
          do: {:topics, opts.topics},
          else: {:partitions, for({t, p, _} <- assignment, do: {t, p})}
        )
      )

      {:ok, Map.merge(opts, %{resource: resource, partitions: %{}})}
    else
      {:error, error} -> {:stop, error}
    end
  end

  # Group mode subscribes; assign mode (Elsa's `consumer:`) lists its partitions.
  defp assignment(%{mode: :group}), do: {:ok, []}

  defp assignment(%{mode: :assign, topics: [topic]} = opts) do
    # A partition the topic does not have would never deliver anything: refused up front.
    partitions =
      with {:ok, count} <-
             Ottla.Admin.partition_count(opts.connection, topic, 10_000) do
        case opts.partition do
          :all ->
            {:ok, Enum.to_list(0..(count - 1))}

          p when p < count ->
            {:ok, [p]}

          p ->
            {:error,
             Ottla.Error.new(
               :unknown_partition,
               "partition #{p} does not exist: topic #{inspect(topic)} has #{count}"
             )}
        end
      end

    position = Ottla.Options.position(opts.begin_offset)
    with {:ok, list} <- partitions, do: {:ok, Enum.map(list, &{topic, &1, position})}
  end

  @impl true
  def handle_info({:ottla_assigned, generation, tps}, state) do
    public = if state.mode == :group, do: generation
    Logger.info("assigned #{inspect(tps)} at generation #{inspect(public)}")

    Telemetry.execute([:ottla, :consumer, :assigned], %{count: length(tps)}, %{
      connection: state.connection,
      partitions: tps,
      generation_id: public
    })

    state =
      Enum.reduce(tps, state, fn tp, acc ->
        entry = %{
          pid: nil,
          ref: nil,
          generation: generation,
          public: public,
          failures: 0,
          acked: nil
        }

        start_worker(put_in(acc.partitions[tp], entry), tp)
      end)

    {:noreply, state}
  end

  def handle_info({:ottla_revoke_done, tps, took_ms}, state) do
    # The revoker stopped the workers the NIF knew of; one still starting (it had not taken
    # its partition over yet) is stopped here.
    {revoked, kept} = Map.split(state.partitions, tps)
    stop_workers(Map.values(revoked), System.monotonic_time(:millisecond) + state.drain_timeout)

    Telemetry.execute(
      [:ottla, :consumer, :revoked],
      %{count: length(tps), duration: System.convert_time_unit(took_ms, :millisecond, :native)},
      %{connection: state.connection, partitions: tps}
    )

    {:noreply, %{state | partitions: kept}}
  end

  def handle_info({:ottla_committed, offsets}, state) do
    offsets
    |> Enum.group_by(fn {_, _, _, ok?} -> if ok?, do: :ok, else: :error end)
    |> Enum.each(fn {result, list} ->
      Telemetry.execute(
        [:ottla, :consumer, :commit],
        %{count: length(list)},
        %{
          connection: state.connection,
          offsets: Enum.map(list, fn {t, p, o, _} -> {t, p, o} end),
          result: result
        }
      )
    end)

    {:noreply, state}
  end

  def handle_info({kind, topic, partition}, state)
      when kind in [:ottla_paused, :ottla_resumed] and is_binary(topic) do
    event = if kind == :ottla_paused, do: :paused, else: :resumed

    Telemetry.execute([:ottla, :consumer, event], %{count: 1}, %{
      connection: state.connection,
      topic: topic,
      partition: partition
    })

    {:noreply, state}
  end

  def handle_info({:DOWN, ref, :process, _pid, reason}, state) do
    case Enum.find(state.partitions, fn {_tp, e} -> e.ref == ref end) do
      nil ->
        {:noreply, state}

      {{topic, partition} = tp, entry} ->
        # Every stop the manager makes itself is demonitored first: this one is unexpected,
        # whatever its reason, unless the partition is being revoked (the revoker stops its
        # worker).
        case Native.consumer_worker_down(state.resource, topic, partition, entry.generation) do
          {:ok, acked} ->
            failures = if acked != entry.acked, do: 0, else: entry.failures + 1
            delay = backoff(state, failures)

            Logger.warning(
              "worker for #{topic}/#{partition} exited: #{inspect(reason, limit: 8, printable_limit: 200)}; " <>
                "restarting in #{delay} ms from the offset after #{inspect(acked)}",
              topic: topic,
              partition: partition
            )

            Process.send_after(self(), {:restart, tp, entry.generation}, delay)
            entry = %{entry | pid: nil, ref: nil, failures: failures, acked: acked}
            {:noreply, put_in(state.partitions[tp], entry)}

          :not_held ->
            {:noreply, %{state | partitions: Map.delete(state.partitions, tp)}}
        end
    end
  end

  def handle_info({:restart, tp, generation}, state) do
    case state.partitions do
      %{^tp => %{generation: ^generation, pid: nil}} -> {:noreply, start_worker(state, tp)}
      _ -> {:noreply, state}
    end
  end

  def handle_info({:ottla_assignment_failed, {topic, partition}, result}, state) do
    # As in Elsa: a failed assignment handler stops the consumer; its supervisor restarts
    # it, and it joins the group again.
    {:stop, {:assignment_received_handler, topic, partition, result}, state}
  end

  def handle_info({:ottla_consumer_fatal, reason, tps}, state) do
    # librdkafka's consumer cannot go on (e.g. fenced by another member under the same
    # :instance_id); the NIF has dropped its partitions. Stop their workers, so no handler
    # works on partitions the group gave to others, and stay stopped: a restart would fence
    # the other member in turn.
    Logger.error(
      "the consumer failed for good and stops consuming: #{reason}; #{length(tps)} " <>
        "partitions released. Restart the connection once the cause is fixed (two members " <>
        "under one :instance_id fence each other)"
    )

    deadline = System.monotonic_time(:millisecond) + state.drain_timeout
    stop_workers(Map.values(state.partitions), deadline)
    {:noreply, %{state | partitions: %{}}}
  end

  def handle_info({:ottla_consumer_failed, %Ottla.Error{} = error}, state) do
    # The group refuses this consumer as configured (e.g. a session.timeout.ms outside the
    # broker's bounds): it would never consume. Fail loudly; the supervisor restarts it and,
    # if it keeps failing, gives up.
    Logger.error("the consumer cannot consume: #{Exception.message(error)}")
    {:stop, {:consumer_failed, error}, state}
  end

  def handle_info({:ottla_consumer_down, thread}, state) do
    Logger.error("the consumer's #{thread} thread failed; restarting the consumer")
    {:stop, {:consumer_down, thread}, state}
  end

  # The parent's exit stops the manager; a linked helper of a user callback ending normally
  # does not.
  def handle_info({:EXIT, _pid, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # A graceful stop drains like a revocation: nothing more is delivered; what was delivered
    # gets what is left of :shutdown_timeout to be acked, from any process (a task a handler
    # handed its batch to, say: the resource stays reachable meanwhile); then the workers
    # stop (busy ones are killed at the deadline); then the resource is forgotten (later acks
    # are dropped cleanly), what was acked is committed, the group is left and the client
    # freed, with a bound.
    deadline = System.monotonic_time(:millisecond) + state.shutdown_timeout
    tag = System.unique_integer([:positive])

    if Native.consumer_drain(state.resource, self(), tag, state.shutdown_timeout) == :ok do
      receive do
        {:ottla_drained, ^tag} -> :ok
      after
        state.shutdown_timeout + 1_000 -> :ok
      end
    end

    stop_workers(Map.values(state.partitions), deadline)
    :persistent_term.erase(key(state))
    :persistent_term.erase(subscription_key(state))

    if state.exactly_once,
      do: :persistent_term.erase({__MODULE__, state.connection, :exactly_once})

    if Native.consumer_close(state.resource, self(), tag) == :ok do
      receive do
        {:ottla_closed, ^tag} -> :ok
      after
        @close_timeout ->
          Logger.warning("the consumer did not close within #{@close_timeout} ms")
      end
    end

    :ok
  end

  # A worker that died right after progress restarts at once; repeated deaths back off like
  # failed batches.
  defp backoff(_state, 0), do: 0

  defp backoff(state, failures),
    do: Native.backoff_ms(state.retry_backoff, state.max_retry_backoff, failures)

  defp start_worker(state, {topic, partition} = tp) do
    entry = state.partitions[tp]

    args = %{
      manager: self(),
      topic: topic,
      partition: partition,
      generation: entry.generation,
      public_generation: entry.public,
      connection: state.connection,
      resource: state.resource,
      handler: state.handler,
      handler_init_args: state.handler_init_args,
      on_failure: state.on_failure,
      offsets_fun: state.offsets_fun,
      begin_offset: state.begin_offset,
      retry_backoff: state.retry_backoff,
      max_retry_backoff: state.max_retry_backoff,
      exactly_once: state.exactly_once,
      drain_timeout: state.drain_timeout,
      # The assignment handler runs once per assignment (the NIF says which worker runs it).
      assignment_received_handler:
        if(state.mode == :group, do: {state.assignment_received_handler, state.group})
    }

    result =
      try do
        DynamicSupervisor.start_child(state.worker_sup, {Ottla.Consumer.Worker, args})
      catch
        :exit, reason -> {:error, {:exit, reason}}
      end

    case result do
      {:ok, pid} ->
        put_in(state.partitions[tp], %{entry | pid: pid, ref: Process.monitor(pid)})

      other ->
        failures = entry.failures + 1

        Logger.error(
          "could not start the worker for #{topic}/#{partition}: #{inspect(other, limit: 5)}"
        )

        Process.send_after(self(), {:restart, tp, entry.generation}, backoff(state, failures))
        put_in(state.partitions[tp], %{entry | failures: failures})
    end
  end

  # Stops the workers of `entries` (demonitored first: these stops are the manager's own),
  # killing those still running at `deadline`.
  defp stop_workers(entries, deadline) do
    pids =
      for %{pid: pid, ref: ref} <- entries, is_pid(pid) do
        Process.demonitor(ref, [:flush])
        pid
      end

    Ottla.Consumer.Revoker.stop_workers(pids, deadline)
  end
end
